"""A tiny ASGI app that real uvicorn runs behind the front door in test_frontdoor.py.

Every ``POST`` is answered with ``ANSWER`` (a 26-byte JSON body, like a model's
three predictions). With ``DIE_AFTER_HEADERS=1`` the process instead sends the
response's headers, lets the event loop run (as MLflow's middleware does), and
kills itself before the body: a replica dying mid-answer, every time.
"""

import asyncio
import os
import signal

BODY = b'{"predictions": [0, 1, 2]}'


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    more = True
    while more:
        more = (await receive()).get("more_body", False)
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(BODY)).encode()),
                (b"x-answered-by", os.environ["ANSWER"].encode()),
            ],
        }
    )
    if os.environ.get("DIE_AFTER_HEADERS") == "1":
        await asyncio.sleep(0.2)
        os.kill(os.getpid(), signal.SIGKILL)
    await send({"type": "http.response.body", "body": BODY})

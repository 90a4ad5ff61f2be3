"""The playground: a page to try the app (index.html, app.js, style.css beside this file), served by the ingress.

Static files that call the job API and nothing else, so no part of the API's schema; open like /healthz (they hold
no job's content; the token the page sends is the user's own)."""

import os

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

DIRECTORY = os.path.dirname(os.path.abspath(__file__))
# The browser enforces what the playground promises: it loads and calls this origin only (blob: holds the media it
# fetched with the bearer token, which <video> and <img> cannot send themselves).
CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                           "img-src 'self' blob: data:; media-src 'self' blob:; base-uri 'none'; "
                           "form-action 'none'; frame-ancestors 'none'")


def mount(api: FastAPI) -> None:
    """The page at `/`, its scripts and style under `/playground/`."""

    @api.get("/", include_in_schema=False)
    async def playground() -> FileResponse:
        return FileResponse(os.path.join(DIRECTORY, "index.html"),
                            headers={"Content-Security-Policy": CONTENT_SECURITY_POLICY})

    api.mount("/playground", StaticFiles(directory=DIRECTORY), name="playground")

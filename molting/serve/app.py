"""The thin OpenAI-compatible layer in front of the llama-server engines.

llama-server does the HTTP, the chat template, the batching and the streaming; it does
not know personas. This Starlette app (served by uvicorn) maps a request's ``model`` to a
persona and forwards the request to that persona's engine with httpx, after two changes:

- the persona's system prompt becomes the first message when the request has none;
- ``"lora"`` is set to every adapter of that engine, the persona's at scale 1 and all the
  others at 0 (any ``lora`` the client sent is replaced), so no request runs another
  persona's adapter.

Answers, streamed (SSE) or not, pass through with one change: their ``model`` field names the
persona the client asked for, not llama-server's model file. llama-server's own errors (a
prompt longer than the context: 400 ``exceed_context_size_error`` with ``n_ctx``) pass through
unchanged. Errors of its own use OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator, Sequence

import httpx
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from molting.serve.plan import ServedPersona, ServePlan


def openai_error(status: int, message: str, kind: str = "invalid_request_error", code: str | None = None) -> Response:
    """An error response in OpenAI's shape."""
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": code}}, status)


def route(persona: ServedPersona, n_adapters: int, body: dict) -> dict:
    """The request for ``persona``'s engine: its system prompt if none is given, its adapter alone.

    Args:
        persona: the persona the request's ``model`` names.
        n_adapters: adapters loaded on the persona's engine (llama-server's LoRA ids 0..n-1).
        body: the client's request (not modified).
    """
    messages = list(body["messages"])
    if not any(isinstance(m, dict) and m.get("role") == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": persona.system_prompt})
    lora = [{"id": i, "scale": 1.0 if i == persona.adapter else 0.0} for i in range(n_adapters)]
    return {**body, "messages": messages, "lora": lora}


def create_app(plan: ServePlan, upstreams: Sequence[str], timeout: float = 600.0) -> Starlette:
    """The ASGI app for ``plan``, whose engine ``i`` listens at ``upstreams[i]``.

    Args:
        plan: the personas and engines (``molting.serve.plan``).
        upstreams: base URLs of the running engines, in ``plan.engines`` order.
        timeout: seconds to wait for an engine's answer (or its next streamed chunk).
    """
    clients = [httpx.AsyncClient(base_url=url, timeout=timeout) for url in upstreams]
    created = int(time.time())

    async def models(request: Request) -> Response:
        data = [
            {"id": p.id, "object": "model", "created": created, "owned_by": "molting"} for p in plan.personas.values()
        ]
        return JSONResponse({"object": "list", "data": data})

    async def health(request: Request) -> Response:
        for client in clients:
            try:
                if (await client.get("/health")).status_code != 200:
                    return JSONResponse({"status": "loading"}, 503)
            except httpx.TransportError:
                return openai_error(503, "an engine does not answer", "unavailable_error")
        return JSONResponse({"status": "ok"})

    async def chat_completions(request: Request) -> Response:
        body = await _json_body(request)
        if isinstance(body, Response):
            return body
        persona = plan.personas.get(body.get("model"))
        if persona is None:
            served = ", ".join(plan.personas)
            return openai_error(
                404, f"model {body.get('model')!r} not found; personas served: {served}", code="model_not_found"
            )
        engine = plan.engines[persona.engine]
        forwarded = route(persona, len(engine.adapters), body)
        return await _forward(clients[persona.engine], forwarded, bool(body.get("stream")), persona.id)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        for client in clients:
            await client.aclose()

    routes = [
        Route("/v1/models", models),
        Route("/health", health),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    ]
    return Starlette(routes=routes, lifespan=lifespan)


async def _json_body(request: Request) -> dict | Response:
    """The request's JSON object with a ``messages`` list, or the 400 that says what is wrong."""
    try:
        body = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return openai_error(400, f"the request body is not valid JSON: {exc}")
    if not isinstance(body, dict):
        return openai_error(400, f"the request body must be a JSON object, not {type(body).__name__}")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        return openai_error(400, '\'messages\' must be a non-empty list of {"role", "content"} objects')
    return body


async def _forward(client: httpx.AsyncClient, body: dict, stream: bool, model: str) -> Response:
    """Send ``body`` to the engine; relay its answer, named ``model``, streamed as it comes when ``stream``."""
    try:
        upstream = await client.send(client.build_request("POST", "/v1/chat/completions", json=body), stream=True)
    except httpx.TransportError as exc:
        return openai_error(503, f"the engine does not answer ({type(exc).__name__})", "unavailable_error")
    content_type = upstream.headers.get("content-type", "application/json")
    if not stream or upstream.status_code != 200:
        content = await upstream.aread()
        await upstream.aclose()
        if upstream.status_code == 200:
            content = rename_model(content, model)
        return Response(content, upstream.status_code, media_type=content_type)
    return StreamingResponse(
        _relay(upstream, model),
        upstream.status_code,
        media_type="text/event-stream",
        background=BackgroundTask(upstream.aclose),
    )


def rename_model(payload: bytes, model: str) -> bytes:
    """A JSON object's bytes with its ``model`` set to ``model``; anything else unchanged."""
    try:
        value = json.loads(payload)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return payload
    if not isinstance(value, dict) or "model" not in value:
        return payload
    return json.dumps({**value, "model": model}, ensure_ascii=False).encode()


def rename_sse_line(line: bytes, model: str) -> bytes:
    """One server-sent-events line; a ``data:`` line's JSON gets ``model`` (``[DONE]`` is kept)."""
    if not line.startswith(b"data:"):
        return line
    payload = line[len(b"data:") :].strip()
    renamed = rename_model(payload, model)
    return line if renamed is payload else b"data: " + renamed


async def _relay(upstream: httpx.Response, model: str) -> AsyncIterator[bytes]:
    """The engine's SSE lines as they arrive, each chunk's ``model`` renamed; closing stops generation.

    Lines are cut at ``\\n`` whatever the network's chunks are. When the client goes away
    Starlette cancels this generator; ``aclose`` then drops the connection to llama-server,
    which stops decoding that request.
    """
    pending = b""
    try:
        async for chunk in upstream.aiter_raw():
            *lines, pending = (pending + chunk).split(b"\n")
            if lines:
                yield b"".join(rename_sse_line(line, model) + b"\n" for line in lines)
        if pending:
            yield rename_sse_line(pending, model)
    finally:
        await upstream.aclose()

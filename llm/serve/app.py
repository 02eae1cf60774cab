"""The HTTP layer: OpenAI's routes on FastAPI, SSE streams (sse-starlette), a bearer-key check.

  GET  /v1/models             the one served model
  POST /v1/completions        prompt text / texts / ids; n, stop, seed, stream, logprobs, echo, ...
  POST /v1/chat/completions   messages through the model's chat template (templates.ChatFormat); n, logprobs,
                              top_logprobs, stream, stream_options.include_usage
  POST /tokenize, /detokenize  text or messages -> ids (as the routes above encode them), ids -> text
  GET  /                     the chat page (static/chat.html; --no-ui turns it off)
  GET  /health                {"status": "ok"} (503 "draining" after SIGTERM)
  GET  /metrics               Prometheus text format

Every refusal is an OpenAI error object, decided before the job reaches the scheduler: validation
(400), unknown model (404), context overflow (400), full queue (429 + Retry-After), draining (503),
missing or wrong key (401). A client that goes away has its job cancelled at the next step.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from sse_starlette import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from llm.chat import ChatError
from llm.generate.decode import fit_prompts
from llm.generate.sampling import SamplingError, SamplingParams
from llm.serve.engine import Event, Seq
from llm.serve.grammar import GrammarError, Grammars
from llm.serve.protocol import APIError, ChatRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest, error_body
from llm.serve.scheduler import QueueFull, Scheduler, ShuttingDown
from llm.serve.templates import ChatFormat
from llm.serve.tools import ToolError, choose, parse_calls, template_reads_tools

OPEN_PATHS = ("/health", "/")  # the chat page holds no secret; its requests carry the key
PAGE = Path(__file__).parent / "static" / "chat.html"
# The page may talk to this server only and run only its own inline script (no request leaves the server).
PAGE_CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; "
            "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


class BearerAuth:
    """ASGI middleware: with a key set, every path but /health needs `Authorization: Bearer KEY` (else 401)."""

    def __init__(self, app, key: str, metrics) -> None:
        self.app, self.key, self.metrics = app, f"Bearer {key}".encode(), metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            got = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not hmac.compare_digest(got, self.key):
                body = error_body("Incorrect or missing API key: send 'Authorization: Bearer KEY'",
                                  "invalid_request_error", None, "invalid_api_key")
                self.metrics.reject("invalid_api_key")
                await JSONResponse(body, 401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class Server:
    """What the routes share: the scheduler, tokenizer, model name and limits."""

    def __init__(self, sched: Scheduler, tok, model_name: str, block_size: int, chat: ChatFormat) -> None:
        self.sched, self.tok, self.model_name, self.block_size = sched, tok, model_name, block_size
        self.chat, self.grammars = chat, Grammars(tok)
        self.adapters = list(sched.engine.adapters)
        self.created = int(time.time())

    # ------------------------------------------------------------------ request -> seqs

    def model_id(self, name: str | None) -> str:
        """The id an answer names: the adapter the request picked, else the base's."""
        return name if name in self.adapters else self.model_name

    def check_model(self, name: str) -> str | None:
        """The LoRA adapter a request's `model` names (None: the base); 404 for any other name."""
        if name in self.adapters:
            return name
        if name != self.model_name:
            served = ", ".join(repr(n) for n in [self.model_name, *self.adapters])
            raise APIError(404, f"The model '{name}' does not exist; this server serves {served}",
                           "invalid_request_error", "model", "model_not_found")

    def encode(self, prompt) -> list[list[int]]:
        """Prompt ids from text, texts, ids or lists of ids (a text prompt gets a BOS as sample.py does)."""
        tok = self.tok
        if isinstance(prompt, str):
            prompt = [prompt]
        if not prompt:
            raise APIError(400, "prompt must not be empty", param="prompt")
        if isinstance(prompt[0], int):
            prompt = [prompt]
        out = []
        for p in prompt:
            if isinstance(p, str):
                out.append(tok.encode(p, bos=tok.add_bos) or [tok.bos_id])
            else:
                if not p or any(i < 0 or i >= tok.n_vocab for i in p):
                    raise APIError(400, f"token-id prompts need ids in [0, {tok.n_vocab}) and at least one id",
                                   param="prompt")
                out.append(list(p))
        return out

    def seqs(self, body, prompts: list[list[int]], max_tokens: int, stop: list[str], logprobs: int | None = None,
             echo: bool = False, stop_ids: frozenset[int] = frozenset(), grammar: str | None = None) -> list[Seq]:
        try:
            fit_prompts(prompts, max(1, max_tokens), self.block_size, fix="shorten the prompt or lower max_tokens")
            params = SamplingParams(1.0 if body.temperature is None else body.temperature, body.top_k, body.top_p,
                                    body.min_p, body.repetition_penalty or 1.0)
        except SamplingError as e:
            code = "context_length_exceeded" if "context length" in str(e) else None
            msg = str(e).replace("max_new_tokens", "max_tokens")
            raise APIError(400, msg, param="max_tokens" if code else None, code=code) from None
        n_rows = len(prompts) * body.n
        if n_rows > self.sched.max_batch:
            raise APIError(400, f"{len(prompts)} prompt(s) x n={body.n} = {n_rows} sequences; this server runs at "
                           f"most {self.sched.max_batch} at once", param="n")
        grammar = grammar or self.grammar(body)
        seed = body.seed if body.seed is not None else secrets.randbelow(2**62)
        out = [Seq(prompt=p, params=params, max_tokens=max_tokens, seed=seed + i * body.n + j, emit=lambda ev: None,
                   stop=stop, stop_ids=stop_ids, logprobs=logprobs, prompt_logprobs=echo and logprobs is not None,
                   grammar=None if grammar is None else self.grammars.matcher(grammar),
                   adapter=self.check_model(body.model))
               for i, p in enumerate(prompts) for j in range(body.n)]
        if self.sched.worst_case_blocks(out) > self.sched.engine.usable_blocks:
            raise APIError(400, "the request needs more KV cache than the server has; lower n or max_tokens",
                           param="max_tokens")
        return out

    def grammar(self, body, schema: dict | None = None) -> str | None:
        """The compiled response_format of a request, or the JSON schema a tool call must follow (None: free
        text); 400 with the compiler's reason."""
        fmt = body.response_format
        if schema is not None:
            if fmt is not None and fmt.type != "text":
                raise APIError(400, "a required or named tool_choice constrains the reply already; drop "
                               "response_format", param="response_format")
            kind, spec, param = "json_schema", schema, "tools"
        elif fmt is None or fmt.type == "text":
            return None
        else:
            kind, spec, param = fmt.type, fmt.spec(), "response_format"
        try:
            return self.grammars.compile(kind, spec)
        except GrammarError as e:
            raise APIError(400, str(e), param=param, code="invalid_response_format") from None

    def tools(self, body) -> tuple[list[dict] | None, dict | None]:
        """(tools to render, the schema a call must follow) of a chat request; 400 for what cannot be served."""
        if not body.tools:
            if body.tool_choice not in (None, "none", "auto"):
                raise APIError(400, "tool_choice needs tools", param="tool_choice")
            return None, None
        tools = [t.model_dump(exclude_none=True) for t in body.tools]
        choice = body.tool_choice.model_dump() if hasattr(body.tool_choice, "model_dump") else body.tool_choice
        try:
            shown, schema = choose(tools, choice)
        except ToolError as e:
            raise APIError(400, str(e), param="tool_choice") from None
        if shown and not template_reads_tools(self.chat.template):
            raise APIError(400, "this model's chat template does not show tools to the model (it never reads "
                           "`tools`); serve it with a --chat-template that does, or send tool_choice 'none'",
                           param="tools")
        return shown, schema

    def submit(self, seqs: list[Seq]):
        try:
            return self.sched.submit(seqs)
        except QueueFull as e:
            raise APIError(429, f"{e}; retry later", "rate_limit_exceeded", None, "queue_full",
                           headers={"Retry-After": "1"}) from None
        except ShuttingDown as e:
            raise APIError(503, str(e), "server_error", None, "shutting_down") from None

    # ------------------------------------------------------------------ events

    async def events(self, job, request: Request | None = None) -> AsyncIterator[tuple[int, Event]]:
        """(choice index, event) until every choice has finished; cancels the job if the caller stops early."""
        left = len(job.seqs)
        watch = asyncio.create_task(self._watch(job, request)) if request is not None else None
        try:
            while left:
                i, ev = await job.queue.get()
                if ev.finish is not None:
                    left -= 1
                yield i, ev
        finally:
            if watch is not None:
                watch.cancel()
            if left:
                self.sched.cancel(job)

    async def _watch(self, job, request: Request) -> None:
        """A non-streaming client that disconnects: cancel its job (streams notice through sse-starlette)."""
        while not job.done:
            if await request.is_disconnected():
                self.sched.cancel(job)
                return
            await asyncio.sleep(0.2)

    def token_str(self, i: int) -> str:
        return self.tok.decode([i])

    def top_dict(self, top) -> dict[str, float] | None:
        return None if top is None else {self.token_str(i): lp for i, lp in top}

    def chat_logprob(self, ev: Event) -> dict:
        """One token of a chat choice's logprobs.content: token, logprob, bytes, top_logprobs (OpenAI's layout)."""
        def one(i: int, lp: float) -> dict:
            return {"token": self.token_str(i), "logprob": lp, "bytes": list(self.tok.decode_bytes([i]))}

        return one(ev.token, ev.logprob) | {"top_logprobs": [one(i, lp) for i, lp in ev.top or []]}


def _err(ev: Event) -> APIError:
    return APIError(500, f"generation failed: {ev.error}", "server_error", None, "internal_error")


class Choice:
    """One completion choice as it accumulates: text, ids, logprobs (legacy completions layout)."""

    def __init__(self, srv: Server, prompt: list[int], prompt_text: str, echo: bool) -> None:
        self.srv, self.text, self.ids, self.finish = srv, prompt_text if echo else "", [], None
        self.lp = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        self.offset = 0 if echo else len(prompt_text)
        self.prompt, self.echo = prompt, echo

    def add_prompt_logprobs(self, plp) -> dict:
        start = len(self.lp["tokens"])
        for tid, (lp, top) in zip(self.prompt, plp):
            self._add_lp(tid, lp, top)
        return {k: v[start:] for k, v in self.lp.items()}

    def _add_lp(self, tid: int, lp: float | None, top) -> None:
        s = self.srv.token_str(tid)
        self.lp["tokens"].append(s)
        self.lp["token_logprobs"].append(lp)
        self.lp["top_logprobs"].append(self.srv.top_dict(top))
        self.lp["text_offset"].append(self.offset)
        self.offset += len(s)

    def add(self, ev: Event) -> dict | None:
        """Fold one event in; returns the logprobs of what it added (None when logprobs are off)."""
        start = len(self.lp["tokens"])
        if ev.prompt_logprobs is not None and self.echo:
            self.add_prompt_logprobs(ev.prompt_logprobs)
        if ev.token is not None:
            self.ids.append(ev.token)
            if ev.logprob is not None:
                self._add_lp(ev.token, ev.logprob, ev.top)
        self.text += ev.text
        self.finish = ev.finish or self.finish
        return {k: v[start:] for k, v in self.lp.items()}


def _error_handlers(app: FastAPI, metrics) -> None:
    """Every error in OpenAI's shape: ours (APIError), bad bodies (400, not FastAPI's 422), unknown routes.
    Every refusal (a 4xx, or 503 while draining) counts in llm_rejected_requests_total{reason=its code}."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        if e.status < 500 or e.status == 503:
            metrics.reject(e.code)
        return JSONResponse(e.body(), e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        err = e.errors()[0] if e.errors() else {}
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        if err.get("type") == "json_invalid":
            msg, param = "We could not parse the JSON body of your request (it is not valid JSON)", None
        else:
            msg, param = f"{'.'.join(loc) or 'body'}: {err.get('msg', 'invalid value')}", (loc[0] if loc else None)
        metrics.reject(None)
        return JSONResponse(error_body(msg, "invalid_request_error", param, None), 400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException) -> JSONResponse:
        metrics.reject("not_found" if e.status_code == 404 else None)
        return JSONResponse(error_body(str(e.detail), "invalid_request_error", None, None), e.status_code)


def create_app(sched: Scheduler, tok, model_name: str, block_size: int, api_key: str | None = None,
               drain_timeout: float = 30.0, chat: ChatFormat | None = None, ui: bool = True) -> FastAPI:
    srv = Server(sched, tok, model_name, block_size, chat or ChatFormat(tok))
    app = FastAPI(title="llm serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = srv
    if api_key:
        app.add_middleware(BearerAuth, key=api_key, metrics=sched.metrics)

    _error_handlers(app, sched.metrics)

    if ui:
        page = PAGE.read_text()

        @app.get("/")
        async def chat_page() -> HTMLResponse:
            return HTMLResponse(page, headers={"Content-Security-Policy": PAGE_CSP, "X-Content-Type-Options": "nosniff",
                                               "Cache-Control": "no-store"})

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = sched.accepting
        return JSONResponse({"status": "ok" if ok else "draining"}, 200 if ok else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(sched.metrics.text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models() -> dict:
        base = {"id": model_name, "object": "model", "created": srv.created, "owned_by": "llm"}
        return {"object": "list", "data": [base] + [base | {"id": a, "parent": model_name} for a in srv.adapters]}

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict:
        if body.model is not None:
            srv.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of prompt and messages", param="prompt")
        if body.messages is not None:
            try:
                ids = srv.chat.prompt([m.as_dict() for m in body.messages])
            except ChatError as e:
                raise APIError(400, str(e), param="messages") from None
        else:
            ids = tok.encode(body.prompt, bos=tok.add_bos and body.add_special_tokens)
        return {"count": len(ids), "max_model_len": block_size, "tokens": ids}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict:
        if body.model is not None:
            srv.check_model(body.model)
        if any(i < 0 or i >= tok.n_vocab for i in body.tokens):
            raise APIError(400, f"token ids must be in [0, {tok.n_vocab})", param="tokens")
        return {"prompt": tok.decode(body.tokens)}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        srv.check_model(body.model)
        prompts = srv.encode(body.prompt)
        max_tokens = 16 if body.max_tokens is None else body.max_tokens
        if max_tokens == 0 and not body.echo:
            raise APIError(400, "max_tokens must be >= 1 (0 only with echo)", param="max_tokens")
        seqs = srv.seqs(body, prompts, max_tokens, body.stops(), body.logprobs, body.echo)
        texts = [body.prompt] if isinstance(body.prompt, str) else None
        if isinstance(body.prompt, list) and body.prompt and isinstance(body.prompt[0], str):
            texts = body.prompt
        texts = texts or [tok.decode(p) for p in prompts]
        choices = [Choice(srv, s.prompt, texts[k // body.n], body.echo) for k, s in enumerate(seqs)]
        job = srv.submit(seqs)
        rid, created = f"cmpl-{secrets.token_hex(12)}", int(time.time())
        head = {"id": rid, "object": "text_completion", "created": created, "model": srv.model_id(body.model)}
        want_lp = body.logprobs is not None
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            return EventSourceResponse(_stream_completion(srv, job, choices, head, want_lp, body.echo,
                                                          usage and body.n),
                                       shutdown_grace_period=drain_timeout)
        async for i, ev in srv.events(job, request):
            if ev.finish == "error":
                raise _err(ev)
            choices[i].add(ev)
        out = [{"index": k, "text": c.text, "logprobs": c.lp if want_lp else None, "finish_reason": c.finish}
               for k, c in enumerate(choices)]
        return head | {"choices": out, "usage": _usage(seqs, body.n)}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        srv.check_model(body.model)
        top = body.n_logprobs()
        shown, schema = srv.tools(body)
        try:
            prompt = srv.chat.prompt([m.as_dict() for m in body.messages], shown)
        except ChatError as e:
            raise APIError(400, str(e), param="messages") from None
        max_tokens = body.max_completion_tokens or body.max_tokens or max(1, block_size - len(prompt))
        seqs = srv.seqs(body, [prompt], max_tokens, body.stops() + srv.chat.stop_strings, top,
                        stop_ids=srv.chat.stop_ids, grammar=srv.grammar(body, schema))
        job = srv.submit(seqs)
        head = {"id": f"chatcmpl-{secrets.token_hex(12)}", "object": "chat.completion", "created": int(time.time()),
                "model": srv.model_id(body.model)}
        usage = body.stream_options is not None and body.stream_options.include_usage
        calls = "forced" if schema is not None else "auto" if shown else None
        if body.stream:
            return EventSourceResponse(_stream_chat(srv, job, head, top is not None, usage and body.n, calls),
                                       shutdown_grace_period=drain_timeout)
        texts, finish = [""] * len(seqs), [None] * len(seqs)
        lps: list[list[dict]] = [[] for _ in seqs]
        async for i, ev in srv.events(job, request):
            if ev.finish == "error":
                raise _err(ev)
            texts[i] += ev.text
            finish[i] = ev.finish or finish[i]
            if top is not None and ev.token is not None:
                lps[i].append(srv.chat_logprob(ev))
        out = []
        for i, t in enumerate(texts):
            message, reason = {"role": "assistant", "content": t}, finish[i]
            found = parse_calls(t) if calls else None
            if found:
                message, reason = {"role": "assistant", "content": None, "tool_calls": found}, "tool_calls"
            out.append({"index": i, "message": message, "logprobs": {"content": lps[i]} if top is not None else None,
                        "finish_reason": reason})
        return head | {"choices": out, "usage": _usage(seqs, body.n)}

    return app


def _usage(seqs: list[Seq], n: int) -> dict:
    p, c = sum(len(s.prompt) for s in seqs[::n]), sum(len(s.out) for s in seqs)  # each prompt counted once
    cached = sum(max(s.cached for s in seqs[i:i + n]) for i in range(0, len(seqs), n))
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c,
            "prompt_tokens_details": {"cached_tokens": cached}}


def _sse(obj) -> dict:
    return {"data": json.dumps(obj, ensure_ascii=False)}


async def _stream_completion(srv: Server, job, choices: list[Choice], head: dict, want_lp: bool, echo: bool,
                             usage_n: int):
    if echo:
        for k, c in enumerate(choices):
            yield _sse(head | {"choices": [{"index": k, "text": c.text, "logprobs": None, "finish_reason": None}]})
    async for i, ev in srv.events(job):
        if ev.finish == "error":
            yield _sse(_err(ev).body())
            break
        before = len(choices[i].text)
        lp = choices[i].add(ev)
        piece = choices[i].text[before:]
        if piece or ev.finish or (want_lp and lp["tokens"]):
            yield _sse(head | {"choices": [{"index": i, "text": piece, "logprobs": lp if want_lp else None,
                                            "finish_reason": ev.finish}]})
    else:
        if usage_n:
            yield _sse(head | {"choices": [], "usage": _usage(job.seqs, usage_n)})
    yield {"data": "[DONE]"}


async def _stream_chat(srv: Server, job, head: dict, want_lp: bool, usage_n: int, calls: str | None = None):
    """Chat chunks: a role delta per choice, content deltas (with logprobs.content), then the usage chunk when
    stream_options.include_usage (usage_n = the request's n), then [DONE]. With tools (calls "forced": the reply
    is a constrained call; "auto": it may be one), a reply that is or may still become a call is held back and
    sent at its end as OpenAI streams calls: the id and name first, then the arguments, finish_reason tool_calls."""
    head = head | {"object": "chat.completion.chunk"}
    held = [""] * len(job.seqs)
    holding = [calls is not None] * len(job.seqs)

    def chunk(i: int, delta: dict, finish=None, lp=None) -> dict:
        return _sse(head | {"choices": [{"index": i, "delta": delta, "logprobs": lp, "finish_reason": finish}]})

    for i in range(len(job.seqs)):
        yield chunk(i, {"role": "assistant", "content": ""})
    async for i, ev in srv.events(job):
        if ev.finish == "error":
            yield _sse(_err(ev).body())
            break
        lp = {"content": [srv.chat_logprob(ev)]} if want_lp and ev.token is not None else None
        text = ev.text
        if holding[i]:
            held[i] += text
            text = ""
            start = held[i].lstrip()
            if calls == "auto" and start and not (start.startswith("{") or "<tool_call>".startswith(start[:11])
                                                  or start.startswith("<tool_call>")):
                holding[i], text, held[i] = False, held[i], ""  # plain content after all: send what was held
        if ev.finish is not None and holding[i]:
            found = parse_calls(held[i])
            if found:
                for k, c in enumerate(found):
                    f = c["function"]
                    yield chunk(i, {"tool_calls": [{"index": k, "id": c["id"], "type": "function",
                                                    "function": {"name": f["name"], "arguments": ""}}]})
                    yield chunk(i, {"tool_calls": [{"index": k, "function": {"arguments": f["arguments"]}}]})
                yield chunk(i, {}, "tool_calls", lp)
                continue
            text = held[i] + text
        if text or ev.finish or lp:
            yield chunk(i, {"content": text} if text else {}, ev.finish, lp)
    else:
        if usage_n:
            yield _sse(head | {"choices": [], "usage": _usage(job.seqs, usage_n)})
    yield {"data": "[DONE]"}

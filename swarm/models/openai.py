"""`OpenAIModel`: any OpenAI-compatible chat-completions server, through the official client."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import openai
from openai.types.chat import ChatCompletion

from swarm.errors import ModelError
from swarm.models.interface import Model, ModelRequest, ModelResponse, ToolCall, Usage

if TYPE_CHECKING:
    from swarm.config import OpenAIModelConfig

__all__ = ["OpenAIModel"]


class OpenAIModel(Model):
    """A chat model behind an OpenAI-compatible endpoint (OpenAI, vLLM, the scripted engine).

    `base_url` includes the API version prefix, e.g. `http://127.0.0.1:8000/scripted/v1`. The
    client retries 408/409/429/5xx answers, connection errors and timeouts `max_retries` times
    with exponential backoff; whatever still fails is raised as `ModelError`.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        timeout_s: float = 60.0,
        max_retries: int = 3,
        max_tokens: int | None = None,
        temperature: float | None = None,
        name: str | None = None,
        http_client: Any = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.name = name or model
        # The client requires a key even for servers that ignore it.
        self._client = openai.AsyncOpenAI(
            base_url=self.base_url,
            api_key=api_key or "unused",
            timeout=timeout_s,
            max_retries=max_retries,
            http_client=http_client,
        )

    @classmethod
    def from_config(cls, cfg: OpenAIModelConfig, *, name: str | None = None) -> OpenAIModel:
        """Build from a validated `OpenAIModelConfig`."""
        return cls(
            base_url=cfg.base_url,
            model=cfg.model,
            api_key=cfg.api_key.get_secret_value() if cfg.api_key is not None else None,
            timeout_s=cfg.timeout_s,
            max_retries=cfg.max_retries,
            max_tokens=cfg.max_tokens,
            temperature=cfg.temperature,
            name=name,
        )

    async def complete(self, request: ModelRequest) -> ModelResponse:
        """Send one chat completion and map the answer; failures become `ModelError`."""
        kwargs: dict[str, Any] = {"model": self.model, "messages": request.messages}
        headers = {"x-session-id": request.session_id, "x-swarm-agent": request.agent}
        if request.tools:
            kwargs["tools"] = request.tools
        max_tokens = request.max_tokens if request.max_tokens is not None else self.max_tokens
        if max_tokens is not None:
            kwargs["max_tokens"] = max_tokens
        temperature = request.temperature if request.temperature is not None else self.temperature
        if temperature is not None:
            kwargs["temperature"] = temperature
        start = time.perf_counter()
        try:
            # The SDK's low-level post keeps its retries, timeouts, errors and typed response,
            # but skips `chat.completions.create`'s parameter transform, which walks every
            # message on every call: 18 ms for a 100-message conversation, growing with it.
            resp = await self._client.post(
                "/chat/completions", cast_to=ChatCompletion, body=kwargs,
                options={"headers": headers},
            )
        except openai.APIStatusError as e:
            raise ModelError(
                f"model {self.model!r} at {self.base_url} answered HTTP {e.status_code}"
                f"{self._retried(e.status_code)}: {_server_message(e)}") from e
        except openai.APITimeoutError as e:
            raise ModelError(
                f"model {self.model!r} at {self.base_url} timed out after {self.timeout_s}s "
                f"({self.max_retries} retries)") from e
        except openai.APIConnectionError as e:
            raise ModelError(
                f"can't reach model {self.model!r} at {self.base_url} "
                f"({self.max_retries} retries): {e.__cause__ or e}") from e
        except openai.OpenAIError as e:
            raise ModelError(f"model {self.model!r} at {self.base_url} failed: {e}") from e
        elapsed = time.perf_counter() - start
        return self._response(resp, elapsed)

    def _retried(self, status: int) -> str:
        retryable = status in (408, 409, 429) or status >= 500
        return f" after {self.max_retries} retries" if retryable and self.max_retries else ""

    def _response(self, resp: Any, elapsed: float) -> ModelResponse:
        if not resp.choices:
            raise ModelError(f"model {self.model!r} at {self.base_url} returned no choices")
        choice = resp.choices[0]
        msg = choice.message
        calls = []
        for c in msg.tool_calls or ():
            if c.type != "function":
                raise ModelError(f"model {self.model!r} returned an unsupported {c.type!r} "
                                 "tool call; only function tools are supported")
            calls.append(ToolCall(id=c.id, name=c.function.name, arguments=c.function.arguments))
        usage = Usage()
        if resp.usage is not None:
            details = resp.usage.prompt_tokens_details
            usage = Usage(
                input_tokens=resp.usage.prompt_tokens,
                output_tokens=resp.usage.completion_tokens,
                cached_input_tokens=(details.cached_tokens or 0) if details is not None else 0,
            )
        return ModelResponse(
            content=msg.content,
            tool_calls=calls,
            usage=usage,
            finish_reason=choice.finish_reason or "stop",
            model=resp.model or self.model,
            time_to_first_token_s=elapsed,
        )

    async def aclose(self) -> None:
        """Close the HTTP client and its connections."""
        await self._client.close()


def _server_message(e: openai.APIStatusError) -> str:
    """The server's own error message when it sent one, else the client's summary."""
    body = e.body
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        return body["message"]
    if isinstance(body, str) and body:
        return body[:500]
    return e.message

"""Official SDK clients pointed at a running proxy, each tagged with a request id."""

from __future__ import annotations

from typing import Any

import anthropic
import openai
from google import genai
from google.genai import types

TIMEOUT = 15.0


def openai_client(proxy_url: str, request_id: str, *, prefix: str = "openai",
                  api_key: str = "sk-test-openai", **kwargs: Any) -> openai.OpenAI:
    return openai.OpenAI(api_key=api_key, base_url=f"{proxy_url}/{prefix}/v1", max_retries=0,
                         timeout=TIMEOUT, default_headers={"X-Request-ID": request_id}, **kwargs)


def anthropic_client(proxy_url: str, request_id: str, *, prefix: str = "anthropic",
                     api_key: str = "sk-ant-test", **kwargs: Any) -> anthropic.Anthropic:
    return anthropic.Anthropic(api_key=api_key, base_url=f"{proxy_url}/{prefix}",
                               max_retries=0, timeout=TIMEOUT,
                               default_headers={"X-Request-ID": request_id}, **kwargs)


def gemini_client(proxy_url: str, request_id: str, *, prefix: str = "gemini",
                  api_key: str = "AIza-test-gemini", version: str | None = None) -> genai.Client:
    return genai.Client(api_key=api_key, http_options=types.HttpOptions(
        base_url=f"{proxy_url}/{prefix}", api_version=version,
        headers={"X-Request-ID": request_id}, timeout=int(TIMEOUT * 1000)))

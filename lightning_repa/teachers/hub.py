"""Fetching pretrained encoder weights through timm's hub loader, failing fast and clearly.

huggingface_hub reads HF_HUB_OFFLINE once, at import; without it an unreachable hub costs
~50 s of retries. Here the environment is read at call time, a short TCP check decides whether
the hub is reachable, and every fetch failure becomes one RuntimeError that names
`encoder_checkpoint`. No Lightning imports.
"""

from __future__ import annotations

import contextlib
import os
import socket
import urllib.parse
from collections.abc import Iterator
from typing import Callable

import timm
from torch import nn

_HUB_CONNECT_TIMEOUT_S = 3.0
_PROXY_ENV_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")




def _env_true(var: str) -> bool:
    return os.environ.get(var, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _hub_reachable(timeout: float = _HUB_CONNECT_TIMEOUT_S) -> bool:
    """A quick TCP connect to the hub endpoint (skipped, i.e. True, behind an HTTP proxy)."""
    if any(os.environ.get(v) for v in _PROXY_ENV_VARS):
        return True
    from huggingface_hub import constants

    url = urllib.parse.urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False


def _offline_reason() -> str | None:
    """Why the hub must not be contacted, or None. Reads the environment now, not at import time."""
    from huggingface_hub import constants

    if _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE") or constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    if not _hub_reachable():
        return f"{constants.ENDPOINT} is unreachable"
    return None


@contextlib.contextmanager
def _hub_offline(enabled: bool) -> Iterator[None]:
    """Put huggingface_hub in offline mode for the block (its flag is read once, at import).

    Offline, hf_hub_download still returns files from the local cache but
    raises at once instead of retrying for ~50 s.
    """
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = saved or enabled
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


def _fetch_error_types() -> tuple[type[BaseException], ...]:
    """Exceptions that mean 'the weights could not be fetched' (network, offline, cache miss, HTTP)."""
    from huggingface_hub import errors

    types: list[type[BaseException]] = [OSError, ConnectionError, TimeoutError, errors.HfHubHTTPError]
    types.append(errors.OfflineModeIsEnabled)
    types.append(errors.EntryNotFoundError)
    for module_name in ("httpx2", "httpx", "requests"):
        with contextlib.suppress(ImportError):
            module = __import__(module_name)
            base = getattr(module, "HTTPError", None) or getattr(module, "RequestException", None)
            if isinstance(base, type) and issubclass(base, BaseException):
                types.append(base)
    return tuple(types)


def _download_message(alias: str, timm_name: str, reason: str) -> str:
    where = ""
    with contextlib.suppress(Exception):
        cfg = timm.models.get_pretrained_cfg(timm.models.split_model_name_tag(timm_name)[0])
        sources = [s for s in (cfg.url, cfg.hf_hub_id and f"https://huggingface.co/{cfg.hf_hub_id}") if s]
        if sources:
            where = f" (available from {' or '.join(sources)})"
    return (
        f"The pretrained weights for `encoder`={alias!r} (timm {timm_name!r}) could not be downloaded: {reason}. "
        f"Download them on a machine with network access{where} and set "
        f"`encoder_checkpoint=/path/to/weights.pth` (official DINOv2 .pth or timm .safetensors)."
    )


def create_pretrained(create: Callable[[], nn.Module], timm_name: str, alias: str) -> nn.Module:
    """Run `create` (timm's hub loader); fail fast and explicitly when offline or unreachable."""
    reason = _offline_reason()
    try:
        with _hub_offline(reason is not None):
            return create()
    except _fetch_error_types() as e:
        detail = reason or f"{type(e).__name__}: {e}"
        if reason is not None:
            detail += " and the weights are not in the local Hugging Face cache"
        raise RuntimeError(_download_message(alias, timm_name, detail)) from e
    except RuntimeError as e:
        if "No pretrained weights" not in str(e):
            raise
        raise RuntimeError(
            f"timm has no pretrained weights for `encoder`={alias!r} (timm {timm_name!r}); "
            "set `encoder_checkpoint=/path/to/weights.pth`, or pick a name with pretrained weights "
            "(e.g. 'vit_small_patch14_dinov2.lvd142m')."
        ) from e

"""Model control through Triton's repository API: load one model, serve a given version, roll back, and
say what a server serves.

The local server runs with ``--model-control-mode explicit`` (serving.triton_args); the repository API
(``POST /v2/repository/models/<name>/load``, the index) is restricted to the admin key (docs/SECURITY.md),
so every call here sends it. A load replaces one model while its old instances keep answering: Triton
loads the new version (or the same one, fresh stubs) and only then unloads the old, so a client sees no
failed request; a load that fails (400) leaves the old model serving.

- New version: a plain load. ``config.pbtxt`` says ``version_policy: latest 1``, so Triton serves the
  newest version directory (serving.repository writes the next version beside the current one).
- Rollback / a given version: a load with a config override, the served config with
  ``version_policy: specific [v]``. The version list comes from the config's ``versions`` parameter
  (serving.repository.VERSIONS_PARAM). An override lasts until the next plain load (a new build) or a
  restart of tritonserver.
- Recovery of a dead stub: a load with the served config as override plus a ``reload`` parameter naming
  the moment, so Triton always starts fresh stubs while keeping the version being served.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from serving.errors import ServerError
from serving.repository import VERSIONS_PARAM
from serving.triton_args import ADMIN_HEADER

log = logging.getLogger(__name__)

RELOAD_PARAM = "reload"  # a config parameter a recovery load sets, so that Triton sees a changed config


class ModelControlError(ServerError):
    """A repository-API call failed: refused (no or wrong key), unknown model or version, or a failed load."""


@dataclass(frozen=True)
class ModelVersions:
    """One model of a server: its state, the versions it serves and the versions its config lists."""

    name: str
    state: str
    served: tuple[int, ...]
    available: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "state": self.state, "served": list(self.served),
                "available": list(self.available)}


def _versions(values) -> tuple[int, ...]:
    return tuple(sorted(int(v) for v in values if str(v).strip().isdigit()))


class ModelControl:
    """The repository API of the server at ``url`` (HTTP ``host:port``) with ``admin_key``."""

    def __init__(self, url: str, admin_key: str | None, *, timeout_s: float = 300.0) -> None:
        self.url, self.admin_key, self.timeout_s = url.removeprefix("http://"), admin_key, timeout_s

    def _call(self, what: str, fn, *args, **kwargs):
        import tritonclient.http as httpclient
        from tritonclient.utils import InferenceServerException

        client = httpclient.InferenceServerClient(self.url, connection_timeout=min(self.timeout_s, 10.0),
                                                  network_timeout=self.timeout_s)
        headers = {ADMIN_HEADER: self.admin_key} if self.admin_key else None
        try:
            return fn(client, *args, headers=headers, **kwargs)
        except InferenceServerException as exc:
            raise ModelControlError(f"{what}: {exc.message() or exc}") from None
        except OSError as exc:  # refused, reset: no server there
            raise ModelControlError(f"{what}: cannot reach {self.url}: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - geventhttpclient's own (a connection closed mid-answer)
            raise ModelControlError(f"{what}: {type(exc).__name__}: {exc}") from None
        finally:
            client.close()

    # -- reading (metadata and config are open; the index needs the key)
    def served_versions(self, name: str) -> tuple[int, ...]:
        """The versions Triton serves now (the model metadata's ``versions``)."""
        meta = self._call(f"metadata of model {name!r}", lambda c, **kw: c.get_model_metadata(name, **kw))
        return _versions(meta.get("versions") or ())

    def config(self, name: str) -> dict[str, Any]:
        """The config the model is served with (an override included)."""
        return self._call(f"config of model {name!r}", lambda c, **kw: c.get_model_config(name, **kw))

    @staticmethod
    def available_versions(config: dict[str, Any]) -> tuple[int, ...]:
        """The version directories a config lists (its ``versions`` parameter)."""
        param = (config.get("parameters") or {}).get(VERSIONS_PARAM) or {}
        return _versions(str(param.get("string_value", "")).split(","))

    def models(self) -> list[ModelVersions]:
        """Every model of the repository with its state and versions (needs the admin key)."""
        index = self._call("repository index", lambda c, **kw: c.get_model_repository_index(**kw))
        states: dict[str, str] = {}
        for row in index:
            name, state = row.get("name", "?"), row.get("state", "") or "UNAVAILABLE"
            if states.get(name) != "READY":
                states[name] = state
        out = []
        for name, state in sorted(states.items()):
            served = self.served_versions(name) if state == "READY" else ()
            available = self.available_versions(self.config(name)) if state == "READY" else ()
            out.append(ModelVersions(name, state, served, available))
        return out

    # -- loading
    def load(self, name: str, config: dict[str, Any] | None = None) -> float:
        """Load (or reload) model ``name``, with ``config`` as an override; the seconds it took."""
        t0 = time.perf_counter()
        text = json.dumps(config) if config is not None else None
        self._call(f"load of model {name!r}", lambda c, **kw: c.load_model(name, config=text, **kw))
        return time.perf_counter() - t0

    def serve_version(self, name: str, version: int) -> float:
        """Serve ``version`` of ``name`` (a load with ``version_policy: specific``); the seconds it took."""
        config = self.config(name)
        available = self.available_versions(config)
        if available and version not in available:
            raise ModelControlError(f"model {name!r} has no version {version} (versions: {list(available)})")
        config["version_policy"] = {"specific": {"versions": [int(version)]}}
        config.get("parameters", {}).pop(RELOAD_PARAM, None)
        seconds = self.load(name, config)
        log.info("model %s now serves version %d (%.1f s)", name, version, seconds)
        return seconds

    def rollback(self, name: str) -> tuple[int, int]:
        """Serve the version before the one served now; (from, to)."""
        served = self.served_versions(name)
        if not served:
            raise ModelControlError(f"model {name!r} serves no version")
        older = [v for v in self.available_versions(self.config(name)) if v < min(served)]
        if not older:
            raise ModelControlError(f"model {name!r} serves version {max(served)} and has no older version to "
                                    "return to")
        self.serve_version(name, older[-1])
        return max(served), older[-1]

    def reload(self, name: str) -> float:
        """Fresh instances (stubs) of ``name`` serving the same version; the seconds it took."""
        config = self.config(name)
        config.setdefault("parameters", {})[RELOAD_PARAM] = {"string_value": f"{time.time():.6f}"}
        return self.load(name, config)

"""A Kubernetes API on loopback for the sandbox: kmock's emulator plus what a real API server adds.

kmock's `KubernetesEmulator` stores objects and serves create, get, list, watch, delete and discovery.
`Cluster` adds what drplan relies on and kmock lacks:

* metadata: uid, creationTimestamp, a cluster-wide increasing resourceVersion, generation (bumped when
  `spec` changes); kind and apiVersion are filled in from discovery;
* PATCH as JSON merge patch, JSON patch, or strategic merge patch (lists of objects with a `name`
  merge by name; other lists are replaced; `$patch` directives are not supported), and PUT as replace
  with the resourceVersion conflict check; a write that changes nothing keeps the resourceVersion;
* status subresource semantics: writes to the object keep its status, writes to `/status` change only it;
* label selectors on list and watch (`a=b`, `a!=b`, `a`, `!a`, `a in (b,c)`, `a notin (b,c)`), watch
  `timeoutSeconds`;
* a Deployment's status belongs to the sandbox's kubelet (`sandbox/kubelet.py`), which runs its pods: created
  with an empty status, changed only through `/status`.

Not emulated: pod objects, namespace deletion cascading, field selectors, admission/validation.

Run as `python -m sandbox.kube_api --listen 127.0.0.1:PORT`; SIGTERM stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import logging
import os
import re
import signal
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp.web
import attrs
import kmock
import yaml
from kmock._internal import dicts, parsing, rendering
from kmock._internal.k8s import KubernetesObjectConflictError

log = logging.getLogger("sandbox.kube_api")

DEPLOYMENTS = kmock.resource("apps", "v1", "deployments")


@attrs.define(kw_only=True)
class Cluster(kmock.KubernetesEmulator):
    """kmock's Kubernetes emulator with metadata, PATCH/PUT semantics and label selectors."""

    _version: int = attrs.field(default=0, init=False)
    _tasks: set[asyncio.Task[Any]] = attrs.field(factory=set, init=False)  # open watches

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        parsing.parse_path = _parse_path  # kmock calls it through the module
        self.resources.load_bundled()  # discovery for the built-in resources of a recent cluster

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        if raw_request.path != "/" and raw_request.path.endswith("/"):  # the client asks for /api/v1/
            raw_request = raw_request.clone(
                rel_url=raw_request.rel_url.with_path(raw_request.path.rstrip("/"), keep_query=True)
            )
        try:
            return await super().__call__(raw_request)
        finally:  # kmock keeps every request and error for test assertions; a long-running server must not
            self._requests.clear()
            for payload in self._payloads:
                payload._requests.clear()
            for errors in self._errors:
                errors.clear()

    async def _handle(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        if request.resource is not None and request.name is not None and request.method in ("PATCH", "PUT"):
            return await self._update(request)
        if request.action is kmock.action.CREATE and isinstance(request.data, dict):
            self._prepare_create(request)
        return await super()._handle(request)

    async def _render_error(self, exc: Exception) -> aiohttp.web.StreamResponse:
        """Errors with the reasons the real API server gives (clients match on NotFound, AlreadyExists)."""
        if isinstance(exc, kmock.KubernetesNotFoundError):
            exc = kmock.KubernetesError(status=404, reason="NotFound", message=exc.message)
        elif isinstance(exc, KubernetesObjectConflictError):
            exc = kmock.KubernetesError(status=409, reason="AlreadyExists", message=exc.message)
        return await super()._render_error(exc)

    def _next_version(self) -> str:
        self._version += 1
        return str(self._version)

    def _type_of(self, resource: kmock.resource) -> tuple[str, str]:
        """apiVersion and kind of a resource, as discovery knows them."""
        kind = self.resources[resource].kind or (resource.plural or "").capitalize()
        return "/".join(filter(None, (resource.group, resource.version))), kind

    def _prepare_create(self, request: rendering.Request) -> None:
        """Stamp the metadata a real API server sets; kmock then stores the object as given."""
        obj = request.data
        api_version, kind = self._type_of(request.resource)
        obj.setdefault("apiVersion", api_version)
        obj.setdefault("kind", kind)
        meta = obj.setdefault("metadata", {})
        if request.namespace:
            meta["namespace"] = request.namespace
        meta.update(
            uid=str(uuid.uuid4()),
            creationTimestamp=_now(),
            resourceVersion=self._next_version(),
        )
        if "spec" in obj:
            meta["generation"] = 1
        if request.resource == DEPLOYMENTS:
            obj["status"] = {}  # owned by the kubelet

    async def _update(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        """PATCH or PUT an existing object (or its status subresource) and record it as a new version."""
        key = (request.resource, request.namespace, request.name)
        async with self._lock:
            if key not in self.objects or self.objects[key].deleted:
                raise kmock.KubernetesObjectNotFoundError()
            stored = self.objects[key]
            old = copy.deepcopy(stored.raw)
            new = _apply(request, old)
            old_meta = old.get("metadata", {})
            wanted = (new.get("metadata") or {}).get("resourceVersion")
            if request.method == "PUT" and wanted and wanted != old_meta.get("resourceVersion"):
                raise kmock.KubernetesError(
                    status=409,
                    reason="Conflict",
                    message=f"Operation cannot be fulfilled on {request.resource.plural} {request.name!r}: "
                    "the object has been modified; please apply your changes to the latest version and try again",
                )
            if "status" in self.resources[request.resource].subresources:
                to_status = request.subresource == "status"
                status_from, new = (new, copy.deepcopy(old)) if to_status else (old, new)
                new.pop("status", None)
                if "status" in status_from:
                    new["status"] = status_from["status"]
            meta = new.setdefault("metadata", {})
            for field in ("name", "namespace", "uid", "creationTimestamp", "resourceVersion", "generation"):
                if field in old_meta:
                    meta[field] = old_meta[field]
                else:
                    meta.pop(field, None)
            for field in ("apiVersion", "kind"):
                new.setdefault(field, old.get(field))
            if new == old:
                return aiohttp.web.json_response(old)
            meta["resourceVersion"] = self._next_version()
            if "generation" in meta and new.get("spec") != old.get("spec"):
                meta["generation"] += 1
            stored.history.append(new)
            if meta.get("deletionTimestamp") and not meta.get("finalizers"):
                stored.delete()  # the last finalizer is gone: the pending deletion completes
                await self._buses[request.resource].put({"type": "DELETED", "object": new})
            else:
                await self._buses[request.resource].put({"type": "MODIFIED", "object": new})
        return aiohttp.web.json_response(new)

    async def _serve_list(self, request: rendering.Request) -> rendering.Payload:
        listing = await super()._serve_list(request)
        assert isinstance(listing, dict)
        selector = request.params.get("labelSelector", "")
        api_version, kind = self._type_of(request.resource)
        return {
            "apiVersion": api_version,
            "kind": f"{kind}List",
            "metadata": {"resourceVersion": str(self._version)},
            "items": [obj for obj in listing["items"] if _selected(selector, obj)],
        }

    async def _serve_watch(self, request: rendering.Request) -> AsyncIterator[rendering.Payload]:
        selector = request.params.get("labelSelector", "")
        timeout = float(request.params.get("timeoutSeconds") or 0) or None
        deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
        events = super()._serve_watch(request)
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)  # cancelled on shutdown: an open watch would otherwise hold the server
        try:
            while True:
                remaining = None if deadline is None else deadline - asyncio.get_running_loop().time()
                try:
                    event = await asyncio.wait_for(anext(events), remaining)
                except (TimeoutError, StopAsyncIteration):
                    return
                if not isinstance(event, dict) or _selected(selector, event.get("object", {})):
                    yield event
        finally:
            self._tasks.discard(task)

    def cancel_tasks(self) -> None:
        """End the open watches."""
        for task in list(self._tasks):
            task.cancel()


_kmock_parse_path = parsing.parse_path


def _parse_path(path: str) -> parsing.ParsedPath:
    """kmock's URL parser, which takes /api/v1/namespaces[/NAME[/status]] for a namespace prefix, fixed."""
    parts = path.strip("/").split("/")
    if parts[:3] == ["api", "v1", "namespaces"] and (
        len(parts) <= 4 or (len(parts) == 5 and parts[4] in ("status", "finalize"))
    ):
        name, subresource = (parts[3:] + [None, None])[:2]
        return parsing.ParsedPath("", "v1", "namespaces", None, name, subresource)
    return _kmock_parse_path(path)


def _apply(request: rendering.Request, old: dict[str, Any]) -> dict[str, Any]:
    """The object after this PUT (the body) or PATCH (merge, JSON or strategic merge patch)."""
    body = request.data
    if request.method == "PUT":
        if not isinstance(body, dict):
            raise kmock.KubernetesError(status=400, reason="BadRequest", message="PUT needs a JSON object")
        return copy.deepcopy(body)
    content_type = request.headers.get("Content-Type", "").split(";")[0].strip()
    if content_type not in {
        "application/merge-patch+json",
        "application/json-patch+json",
        "application/strategic-merge-patch+json",
    }:
        raise kmock.KubernetesError(
            status=415, reason="UnsupportedMediaType", message=f"unsupported patch type {content_type!r}"
        )
    if isinstance(body, dict) and content_type == "application/strategic-merge-patch+json":
        body = _strategic(old, body)
    try:
        return dict(dicts.patch_dict(old, body))
    except Exception as exc:
        raise kmock.KubernetesError(status=422, reason="Invalid", message=f"cannot apply the patch: {exc}") from exc


def _named(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, dict) and "name" in item for item in value)


def _strategic(old: Any, patch: dict[str, Any]) -> dict[str, Any]:
    """Turn a strategic merge patch into a merge patch: lists of named objects are merged by name."""
    if not isinstance(old, dict):
        return patch
    result: dict[str, Any] = {}
    for key, value in patch.items():
        current = old.get(key)
        if isinstance(value, dict):
            value = _strategic(current, value)
        elif value and current and _named(value) and _named(current):
            changes = {item["name"]: item for item in value}
            value = [
                dicts.patch_dict(item, _strategic(item, changes.pop(item["name"]))) if item["name"] in changes else item
                for item in current
            ] + list(changes.values())
        result[key] = value
    return result


_REQUIREMENT = re.compile(r"(!?)\s*([\w./-]+)\s*(?:(==|=|!=)\s*([\w.-]*)|\s+(in|notin)\s*\(([^)]*)\))?")


def _selected(selector: str, obj: dict[str, Any]) -> bool:
    """Whether the object's labels match a Kubernetes label selector."""
    labels = (obj.get("metadata") or {}).get("labels") or {}
    for term in re.split(r",(?![^(]*\))", selector):
        if not term.strip():
            continue
        match = _REQUIREMENT.fullmatch(term.strip())
        if not match or (match.group(1) and match.group(3, 5) != (None, None)):
            raise kmock.KubernetesError(
                status=400, reason="BadRequest", message=f"unable to parse requirement {term.strip()!r}"
            )
        negated, key, op, value, set_op, values = match.groups()
        choices = {v.strip() for v in (values or "").split(",")}
        ok = {
            None: key in labels,
            "=": labels.get(key) == value,
            "==": labels.get(key) == value,
            "!=": labels.get(key) != value,
            "in": labels.get(key) in choices,
            "notin": labels.get(key) not in choices,
        }[op or set_op]
        if ok == bool(negated):
            return False
    return True


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def write_kubeconfig(path: Path, server_url: str, context: str) -> None:
    """Add (or replace) `context`, with a cluster and user of the same name, in a kubeconfig file (mode 0600)."""
    config: dict[str, Any] = {}
    if path.is_file():
        config = yaml.safe_load(path.read_text()) or {}
    config.setdefault("apiVersion", "v1")
    config.setdefault("kind", "Config")
    entries = {
        "clusters": {"name": context, "cluster": {"server": server_url}},
        "users": {"name": context, "user": {}},
        "contexts": {"name": context, "context": {"cluster": context, "user": context}},
    }
    for section, entry in entries.items():
        config[section] = [e for e in config.get(section) or [] if e.get("name") != context] + [entry]
    config.setdefault("current-context", context)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        os.fchmod(out.fileno(), 0o600)
        yaml.safe_dump(config, out, sort_keys=False)


async def serve(host: str, port: int) -> None:
    """Serve the emulated cluster on host:port until SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    cluster = Cluster()
    async with cluster, kmock.Server(cluster, host=host, port=port) as server:
        log.info("Kubernetes API listening on %s", server.url)
        await stop.wait()
        cluster.cancel_tasks()
    log.info("Kubernetes API stopped")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", required=True, metavar="HOST:PORT", help="address to serve on")
    args = parser.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)  # the app polls its Secrets every second
    asyncio.run(serve(host.strip("[]"), int(port)))


if __name__ == "__main__":
    main()

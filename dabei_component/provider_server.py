"""A client for the real dynamic provider server (`python -m pulumi.dynamic`), spoken to over gRPC.

This is how the Pulumi engine drives dynamic providers: the provider object travels as a dill-serialized
string under `__provider`, properties as protobuf Structs. The demo and the tests use it, so every step
runs the way `pulumi up` runs it, serialization included.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import grpc
from pulumi.dynamic.dynamic import serialize_provider
from pulumi.runtime import rpc
from pulumi.runtime.proto import provider_pb2, provider_pb2_grpc

PROVIDER_KEY = "__provider"


class ProviderCallError(RuntimeError):
    """A provider call failed; the text is what the provider raised (its traceback's last lines)."""


@dataclass
class Checked:
    inputs: dict[str, Any]
    failures: list[tuple[str, str]]


@dataclass
class Diffed:
    changes: bool | None  # None: the provider could not tell (DIFF_UNKNOWN)
    replaces: list[str]


@dataclass
class ProviderServer:
    """One provider server process. `log_path` collects what the providers print (their progress)."""

    project: str
    log_path: Path
    env: Mapping[str, str] = field(default_factory=dict)
    echo: IO[str] | None = None  # also copy provider output here (the demo shows progress)

    def __post_init__(self) -> None:
        env = {**os.environ, **self.env, "PULUMI_PROJECT": self.project}
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the server
        self._proc = subprocess.Popen(
            [sys.executable, "-u", "-m", "pulumi.dynamic"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        assert self._proc.stdout is not None and self._proc.stderr is not None
        line = self._proc.stdout.readline().decode().strip()
        if not line.isdigit():
            err = self._proc.stderr.read().decode(errors="replace")
            raise ProviderCallError(f"the provider server did not start: {line!r} {err[-2000:]}")
        self.port = int(line)
        self._pumps = [
            threading.Thread(target=self._pump, args=(stream,), daemon=True)
            for stream in (self._proc.stdout, self._proc.stderr)
        ]
        for t in self._pumps:
            t.start()
        # A failed step's error (journal tails of many hosts) travels in the status metadata: above 8 KiB.
        self._channel = grpc.insecure_channel(
            f"127.0.0.1:{self.port}",
            options=[("grpc.max_metadata_size", 1 << 20), ("grpc.absolute_max_metadata_size", 1 << 20)],
        )
        self._stub = provider_pb2_grpc.ResourceProviderStub(self._channel)

    def _pump(self, stream: IO[bytes]) -> None:
        for chunk in iter(stream.readline, b""):
            self._log.write(chunk)
            self._log.flush()
            if self.echo is not None:
                self.echo.write(chunk.decode(errors="replace"))
                self.echo.flush()

    @property
    def pid(self) -> int:
        return self._proc.pid

    def close(self) -> None:
        self._channel.close()
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        for t in self._pumps:
            t.join(timeout=5)
        self._log.close()

    def kill(self) -> None:
        """End the server abruptly, as a crash would."""
        self._proc.kill()
        self._proc.wait()

    # -- the calls -----------------------------------------------------------------------------------

    @staticmethod
    def _struct(props: Mapping[str, Any]) -> Any:
        # A private loop: asyncio.run would unset the calling thread's loop, which Pulumi's runtime uses.
        loop = asyncio.new_event_loop()
        try:
            return loop.run_until_complete(rpc.serialize_properties(dict(props), {}))
        finally:
            loop.close()

    @staticmethod
    def _dict(struct: Any, keep_unknowns: bool = False) -> dict[str, Any]:
        return rpc.deserialize_properties(struct, keep_unknowns)

    def _call(self, method: str, request: Any) -> Any:
        try:
            return getattr(self._stub, method)(request)
        except grpc.RpcError as exc:
            details = exc.details() if hasattr(exc, "details") else str(exc)
            raise ProviderCallError(f"{method}: {details}") from None

    def configure(self, config: Mapping[str, str]) -> None:
        self._call("Configure", provider_pb2.ConfigureRequest(args=self._struct(config)))

    def with_provider(self, provider: Any, props: Mapping[str, Any]) -> dict[str, Any]:
        return {**props, PROVIDER_KEY: serialize_provider(provider)}

    def check(self, urn: str, olds: Mapping[str, Any], news: Mapping[str, Any]) -> Checked:
        resp = self._call("Check", provider_pb2.CheckRequest(urn=urn, olds=self._struct(olds), news=self._struct(news)))
        return Checked(self._dict(resp.inputs, True), [(f.property, f.reason) for f in resp.failures])

    def diff(self, urn: str, id_: str, olds: Mapping[str, Any], news: Mapping[str, Any]) -> Diffed:
        resp = self._call(
            "Diff",
            provider_pb2.DiffRequest(urn=urn, id=id_, olds=self._struct(olds), news=self._struct(news)),
        )
        changes = {
            provider_pb2.DiffResponse.DIFF_SOME: True,
            provider_pb2.DiffResponse.DIFF_NONE: False,
        }.get(resp.changes)
        return Diffed(changes, list(resp.replaces))

    def create(self, urn: str, props: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
        resp = self._call("Create", provider_pb2.CreateRequest(urn=urn, properties=self._struct(props)))
        return resp.id, self._dict(resp.properties)

    def update(self, urn: str, id_: str, olds: Mapping[str, Any], news: Mapping[str, Any]) -> dict[str, Any]:
        resp = self._call(
            "Update",
            provider_pb2.UpdateRequest(urn=urn, id=id_, olds=self._struct(olds), news=self._struct(news)),
        )
        return self._dict(resp.properties)

    def read(
        self, urn: str, id_: str, props: Mapping[str, Any], inputs: Mapping[str, Any] | None = None
    ) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """Refresh's Read: the recorded outputs (and inputs); returns the outputs read and, when the provider
        gave them, new inputs."""
        request = provider_pb2.ReadRequest(
            urn=urn, id=id_, properties=self._struct(props), inputs=self._struct(inputs) if inputs else None
        )
        resp = self._call("Read", request)
        new_inputs = self._dict(resp.inputs) if resp.HasField("inputs") else None
        return self._dict(resp.properties), new_inputs

    def delete(self, urn: str, id_: str, props: Mapping[str, Any]) -> None:
        self._call("Delete", provider_pb2.DeleteRequest(urn=urn, id=id_, properties=self._struct(props)))

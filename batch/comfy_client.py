"""A small client for a running ComfyUI server's HTTP API (stdlib only).

Used by the server tests, the demo and batch jobs: queue an API-format graph, wait for it, read outputs.
"""
from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PromptFailed(RuntimeError):
    pass


@dataclass
class ComfyClient:
    base_url: str
    client_id: str = ""

    def __post_init__(self) -> None:
        self.client_id = self.client_id or uuid.uuid4().hex

    def _request(self, path: str, payload: Any = None, timeout: float = 30) -> Any:
        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(self.base_url + path, data=data,
                                     headers={"Content-Type": "application/json"} if data else {})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            body = resp.read()
        return json.loads(body) if body else None

    def get(self, path: str, timeout: float = 30) -> Any:
        return self._request(path, timeout=timeout)

    def object_info(self) -> dict[str, Any]:
        return self.get("/object_info", timeout=120)

    def queue(self, graph: dict[str, Any], workflow: dict[str, Any] | None = None) -> str:
        """POST /prompt; raises PromptFailed with the server's validation errors (HTTP 400)."""
        payload: dict[str, Any] = {"prompt": graph, "client_id": self.client_id}
        if workflow is not None:
            payload["extra_data"] = {"extra_pnginfo": {"workflow": workflow}}
        try:
            reply = self._request("/prompt", payload)
        except urllib.error.HTTPError as err:
            raise PromptFailed(f"the server rejected the graph: {err.read().decode(errors='replace')}") from err
        if reply.get("node_errors"):
            raise PromptFailed(f"node errors: {reply['node_errors']}")
        return reply["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 600, poll: float = 0.25) -> dict[str, Any]:
        """Wait for a queued prompt; return its history entry, or raise PromptFailed with the host's message."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            history = self.get(f"/history/{prompt_id}")
            entry = history.get(prompt_id) if history else None
            if entry:
                status = entry.get("status") or {}
                if status.get("status_str") == "error":
                    messages = [m for m in status.get("messages", []) if m[0] == "execution_error"]
                    raise PromptFailed(f"execution failed: {messages}")
                if status.get("completed", True):
                    return entry
            time.sleep(poll)
        raise PromptFailed(f"prompt {prompt_id} did not finish within {timeout:.0f} s")

    def run(self, graph: dict[str, Any], timeout: float = 600) -> dict[str, Any]:
        return self.wait(self.queue(graph), timeout=timeout)

    def interrupt(self) -> None:
        self._request("/interrupt", {})

    def upload_image(self, path: Path, subfolder: str = "", name: str | None = None, overwrite: bool = True,
                     timeout: float = 120) -> str:
        """POST /upload/image (multipart, as the web UI sends it) into the server's input folder as `name`
        (default: the file's name); returns the name LoadImage takes (``subfolder/name``). Works on the PyPI
        host and upstream alike."""
        path = Path(path)
        name = name or path.name
        boundary = uuid.uuid4().hex
        fields = {"type": "input", "subfolder": subfolder, "overwrite": "true" if overwrite else "false"}
        body = b"".join(f"--{boundary}\r\nContent-Disposition: form-data; name=\"{k}\"\r\n\r\n{v}\r\n".encode()
                        for k, v in fields.items())
        body += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{name}\"\r\n"
                 "Content-Type: application/octet-stream\r\n\r\n").encode() + path.read_bytes()
        body += f"\r\n--{boundary}--\r\n".encode()
        req = urllib.request.Request(self.base_url + "/upload/image", data=body,
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            reply = json.loads(resp.read())
        return f"{reply['subfolder']}/{reply['name']}" if reply.get("subfolder") else reply["name"]


def output_files(entry: dict[str, Any], output_dir: Path) -> list[Path]:
    """Paths of the files a finished prompt reported under its outputs (images of SaveImage and the like)."""
    files = []
    for node_output in entry.get("outputs", {}).values():
        for item in node_output.get("images", []):
            if item.get("type", "output") == "output":
                files.append(Path(output_dir) / item.get("subfolder", "") / item["filename"])
    return files


def wait_until_ready(proc: subprocess.Popen, base_url: str, timeout: float = 180) -> None:
    """Wait for the server to answer; fail early, with its log, if the process dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the ComfyUI server exited with code {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(base_url + "/system_stats", timeout=2):
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            time.sleep(0.3)
    raise RuntimeError(f"the ComfyUI server did not answer on {base_url} within {timeout:.0f} s")


def stop(proc: subprocess.Popen, grace: float = 10) -> None:
    """Stop the server by its PID: SIGTERM, then SIGKILL after `grace` seconds."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=grace)

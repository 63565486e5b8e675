"""One `sglang.launch_server` on one GPU, from start to a checked shutdown (launch_matrix.py, soak.py).

A server runs in its own process group, pinned to one GPU (nvidia-smi's index, PCI bus order for CUDA too), talks on
127.0.0.1 only, and every wait is bounded. `stop()` sends SIGTERM to the launcher alone and then checks what a clean
shutdown means: the launcher exited by itself, no process of its group is left, the port is free and the GPU has its
memory back.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

HOST = "127.0.0.1"
LEFTOVER_GIB = 0.5  # more GPU memory than this missing after stop counts as left behind


def launch_cmd(model: str, port: int, flags) -> list:
    return [sys.executable, "-m", "sglang.launch_server", "--model-path", model, "--host", HOST, "--port", str(port),
            *flags]


def _smi(gpu: int, query: str, what: str = "--query-gpu") -> list:
    try:
        out = subprocess.run(["nvidia-smi", "-i", str(gpu), f"{what}={query}", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def gpu_free_gib(gpu: int):
    rows = _smi(gpu, "memory.free")
    return round(int(rows[0]) / 1024, 2) if rows else None


def gpu_info(gpu: int) -> dict:
    rows = _smi(gpu, "name,memory.total,driver_version")
    if not rows:
        return {"gpu": "none"}
    name, total, driver = [x.strip() for x in rows[0].split(",")]
    return {"gpu": name, "gpu_memory_total_gib": round(int(total) / 1024, 2), "driver": driver}


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is not a listener
        try:
            s.bind((HOST, port))
            return True
        except OSError:
            return False


def group_pids(pgid: int) -> list:
    """Live (not zombie) processes of a process group, from /proc."""
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            stat = open(f"/proc/{name}/stat").read()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()  # after "pid (comm) ": state, ppid, pgrp, ...
        if int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(name))
    return pids


class Server:
    def __init__(self, cmd: list, log_path: str, port: int, gpu: int = 0, env: dict = None):
        self.cmd, self.log_path, self.port, self.gpu = cmd, log_path, port, gpu
        self.env = {**os.environ, "CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": str(gpu), **(env or {})}
        self.proc = None

    def start(self) -> None:
        with open(self.log_path, "w") as log:  # own session: the group is ours to check and, at worst, kill
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                         start_new_session=True)

    def log_text(self) -> str:
        try:
            return open(self.log_path, errors="replace").read()
        except OSError:
            return ""

    def url(self, path: str) -> str:
        return f"http://{HOST}:{self.port}{path}"

    def healthy(self) -> bool:
        try:
            return urllib.request.urlopen(self.url("/health"), timeout=5).status == 200
        except (OSError, urllib.error.URLError):
            return False

    def wait_ready(self, limit_s: float) -> str:
        """"ready", "exited" (the launcher ended first) or "timeout"."""
        t0 = time.time()
        while time.time() - t0 < limit_s:
            if self.proc.poll() is not None:
                return "exited"
            if self.healthy():
                return "ready"
            time.sleep(1)
        return "timeout"

    def get(self, path: str, timeout: float = 30):
        return json.loads(urllib.request.urlopen(self.url(path), timeout=timeout).read())

    def post(self, path: str, body: dict, timeout: float = 300):
        req = urllib.request.Request(self.url(path), json.dumps(body).encode(), {"Content-Type": "application/json"})
        return json.loads(urllib.request.urlopen(req, timeout=timeout).read())

    def stop(self, grace_s: float = 60, free_before=None) -> dict:
        """SIGTERM to the launcher, then the checks of a clean shutdown; SIGKILL for the group only if it is
        still there after grace_s (and then the shutdown was not clean)."""
        t0, pgid = time.time(), self.proc.pid
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            pass
        exited = self.proc.poll() is not None
        while group_pids(pgid) and time.time() - t0 < grace_s + 15:
            time.sleep(1)
        leftover = group_pids(pgid)
        if leftover or not exited:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(30)
            t_kill = time.time()
            while group_pids(pgid) and time.time() - t_kill < 15:
                time.sleep(0.5)
        free_after = gpu_free_gib(self.gpu)
        while (free_before is not None and free_after is not None and free_after < free_before - LEFTOVER_GIB
               and time.time() - t0 < grace_s + 45):  # the driver hands memory back a moment after exit
            time.sleep(2)
            free_after = gpu_free_gib(self.gpu)
        left_gib = (round(max(0.0, free_before - free_after), 2)
                    if free_before is not None and free_after is not None else None)
        out = {"exit_code": self.proc.returncode, "exited_on_sigterm": exited, "leftover_pids": leftover,
               "port_free": port_free(self.port), "gpu_free_gib_after": free_after, "gpu_left_gib": left_gib,
               "seconds": round(time.time() - t0, 1)}
        out["clean"] = (exited and not leftover and out["port_free"]
                        and (left_gib is None or left_gib <= LEFTOVER_GIB))
        return out

"""phi4 on Ray Serve (`phi4 serve --replicas 2`) on this CPU machine with a local Ray instance and the demo
checkpoint: concurrent streams through the openai client spread over both replicas, a shared prefix stays
on the replica that caches it, the same seed gives the same text whichever replica answers, each replica runs on
a core of its own and only its engine thread preempts other threads when it wakes, a replica killed mid-stream
fails only its own requests and is replaced (on the core the dead one left); the router's choices in isolation;
and the KubeRay manifest names the builder the CLI runs."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import types
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.live_server import API_KEY, free_port

ray = pytest.importorskip("ray")
pytest.importorskip("ray.serve")
DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


class Fleet:
    def __init__(self, tmp: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(tmp / "fleet.log", "w")  # noqa: SIM115
        env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_DEDUP_LOGS="0")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "phi4.cli", "serve", "--model", "demo", "--replicas", "2", "--cpus-per-replica",
             "1", "--max-model-len", "1024", "--api-key", API_KEY, "--port", str(self.port), "--host", "127.0.0.1"],
            stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.headers = {"Authorization": f"Bearer {API_KEY}"}
        self.shared_ports: list[int] = []  # ports another fleet holds with SO_REUSEPORT while this one runs

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health", timeout=10).json()

    def wait_healthy(self, replicas: int = 2, timeout: float = 300) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, Path(self.log.name).read_text()[-3000:]
            try:
                response = httpx.get(f"{self.url}/health", timeout=5)
                if response.status_code == 200 and response.json()["healthy_replicas"] >= replicas:
                    return response.json()
            except (httpx.HTTPError, ValueError, KeyError):
                pass
            time.sleep(0.5)
        raise TimeoutError(Path(self.log.name).read_text()[-3000:])

    def replica_series(self, name: str) -> dict[str, float]:
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        return {m.group(1): float(m.group(2)) for m in re.finditer(rf'^{name}{{replica="([^"]+)"[^}}]*}} (\S+)$',
                                                                      text, re.MULTILINE)}

    def stop(self) -> None:
        """SIGTERM to phi4 alone (it takes Serve and its local Ray down); anything left of its group after."""
        self.process.terminate()
        try:
            code = self.process.wait(timeout=60)
        finally:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait()
            self.log.close()
        assert code == 0, Path(self.log.name).read_text()[-3000:]


@contextlib.contextmanager
def ports_held(*ports: int, shared: bool = False) -> Iterator[list[int]]:
    """Listening sockets on `ports`, where they are free, as another fleet holds them: its HAProxy's on every
    interface, or (`shared`) its ingress's and proxy's, on loopback with SO_REUSEPORT, which a process that binds
    one of them so too shares without an error. Yields the ports held."""
    with contextlib.ExitStack() as stack:
        held = []
        for port in ports:
            sock = stack.enter_context(socket.socket())
            if shared:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            try:
                sock.bind(("127.0.0.1" if shared else "", port))
                sock.listen()
                held.append(port)
            except OSError:
                pass  # taken already (without SO_REUSEPORT, where shared: nothing can share it)
        yield held


RAY_SHARED_PORTS = (30000, 8500)  # Ray Serve's first ingress port and its fallback proxy's, opened with SO_REUSEPORT


def listeners(port: int) -> int:
    """How many sockets listen on `port` (any address), from the kernel's tables."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            count += fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port
    return count


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, demo_dir: Path) -> Iterator[Fleet]:
    # Another fleet runs on this machine: its HAProxy holds the default exporter and stats ports (while this one
    # starts), its ingress and proxy the default ports they share (for as long as this one runs)
    with ports_held(*RAY_SHARED_PORTS, shared=True) as shared:
        with ports_held(9101, 8404):
            instance = Fleet(tmp_path_factory.mktemp("fleet"))
            instance.shared_ports = shared
            try:
                instance.wait_healthy(2)
            except BaseException:
                instance.stop()
                raise
        try:
            yield instance
        finally:
            instance.stop()


def running_haproxy_config(port: int) -> str:
    """The configuration of the running HAProxy that serves `port`."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if args and args[0].endswith("haproxy") and "-f" in args:
            config = Path(args[args.index("-f") + 1]).read_text()
            if f"bind 127.0.0.1:{port}\n" in config:
                return config
    raise AssertionError(f"no HAProxy serves port {port}")


def test_a_local_fleets_haproxy_is_sized_to_the_machine_and_logs_no_request_metrics(fleet: Fleet) -> None:
    from phi4.cluster.options import haproxy_threads

    config = running_haproxy_config(fleet.port)
    assert f"nbthread {haproxy_threads()}\n" in config  # 1 on a 2-core machine; Ray's default is 4
    assert "metrics.sock" not in config and "log-format-sd" not in config  # no log line per request to parse


def test_a_fleet_shares_no_port_with_another_on_the_machine(fleet: Fleet) -> None:
    """Ray Serve's ingress and proxy listen with SO_REUSEPORT on ports that start from fixed defaults: a second
    fleet's would bind the first fleet's ports too, and the kernel would split the connections between the two
    fleets. A local phi4 fleet takes free ports of its own."""
    if not fleet.shared_ports:
        pytest.skip("Ray Serve's default ports are taken here without SO_REUSEPORT")
    assert {port: listeners(port) for port in fleet.shared_ports} == {port: 1 for port in fleet.shared_ports}


@pytest.fixture(scope="module")
def client(fleet: Fleet):  # noqa: ANN201
    import openai

    return openai.OpenAI(base_url=f"{fleet.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


def counts(fleet: Fleet) -> dict[str, float]:
    return fleet.replica_series("phi4_replica_requests_total")


def wait_reported(fleet: Fleet, expected_total: float, timeout: float = 30) -> dict[str, float]:
    """Replicas report once a second: wait until the counters include `expected_total` requests."""
    deadline = time.monotonic() + timeout
    while sum(counts(fleet).values()) < expected_total and time.monotonic() < deadline:
        time.sleep(0.2)
    return counts(fleet)


def test_concurrent_streams_spread_over_both_replicas(fleet: Fleet, client) -> None:  # noqa: ANN001
    health = fleet.health()
    assert health["status"] == "ok" and len({r["replica"] for r in health["replicas"]}) == 2
    assert all({"replica", "node", "healthy", "running", "waiting", "kv_cache_usage"} <= set(r)
               for r in health["replicas"])
    before = counts(fleet)

    async def one(index: int) -> str:
        import openai

        async_client = openai.AsyncOpenAI(base_url=client.base_url, api_key=API_KEY, max_retries=0)
        stream = await async_client.chat.completions.create(
            model="microsoft/phi-4", messages=[{"role": "user", "content": f"Request number {index}: say hi"}],
            max_tokens=8, stream=True, seed=index)
        text = "".join([chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices])
        await async_client.close()
        return text

    async def all_of_them() -> list[str]:
        return await asyncio.gather(*(one(i) for i in range(8)))

    texts = asyncio.run(all_of_them())
    assert len(texts) == 8 and all(texts)
    after = wait_reported(fleet, sum(before.values()) + 8)
    served = {replica: after[replica] - before.get(replica, 0) for replica in after}
    assert sum(served.values()) == 8 and sum(1 for n in served.values() if n > 0) == 2, served
    # The CLI chose Ray Serve's settings before importing it, so the ingress reaches the replicas by gRPC
    # (serve_cluster says so in its log otherwise).
    assert "imported before its settings were chosen" not in Path(fleet.log.name).read_text()


def test_the_same_seed_gives_the_same_text_from_either_replica(fleet: Fleet) -> None:
    body = {"model": "microsoft/phi-4", "prompt": "Hello", "max_tokens": 12, "temperature": 1.0, "seed": 1234}
    texts: list[tuple[str, str]] = []
    # A one-token prompt has no prefix block: replicas are chosen by load alone. Each answer waits for the replicas'
    # next report (once a second) to learn who gave it, so stop once both gave two.
    def each_answered_twice() -> bool:
        per_replica = Counter(replica for replica, _ in texts)
        return len(per_replica) == 2 and min(per_replica.values()) >= 2

    while len(texts) < 12 and not each_answered_twice():
        before = counts(fleet)
        response = httpx.post(f"{fleet.url}/v1/completions", json=body, headers=fleet.headers, timeout=60)
        after = wait_reported(fleet, sum(before.values()) + 1)
        replica = next(r for r in after if after[r] > before.get(r, 0))
        texts.append((replica, response.json()["choices"][0]["text"]))
    assert len({replica for replica, _ in texts}) == 2, "both replicas answered"
    assert len({text for _, text in texts}) == 1, texts


def test_a_stream_carries_what_the_whole_answer_carries(fleet: Fleet) -> None:
    # A replica sends a stream's tokens in batches, each merged into one chunk: nothing is lost or reordered.
    body = {"model": "microsoft/phi-4", "prompt": "Once upon a time", "max_tokens": 24, "temperature": 0,
            "ignore_eos": True, "logprobs": 2}
    before = counts(fleet)
    whole = httpx.post(f"{fleet.url}/v1/completions", json=body, headers=fleet.headers, timeout=60).json()
    events = []
    with httpx.stream("POST", f"{fleet.url}/v1/completions", json={**body, "stream": True}, headers=fleet.headers,
                      timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                events.append(json.loads(line.removeprefix("data: ")))
    streamed = [event["choices"][0] for event in events if event["choices"]]
    expected = whole["choices"][0]
    assert "".join(c["text"] for c in streamed) == expected["text"]
    assert [t for c in streamed if c["logprobs"] for t in c["logprobs"]["tokens"]] == expected["logprobs"]["tokens"]
    assert [lp for c in streamed if c["logprobs"] for lp in c["logprobs"]["token_logprobs"]] \
        == pytest.approx(expected["logprobs"]["token_logprobs"])
    assert len(expected["logprobs"]["tokens"]) == 24 and streamed[-1]["finish_reason"] == "length"
    wait_reported(fleet, sum(before.values()) + 2)  # the next test counts requests from the replicas' reports


def test_a_shared_prefix_stays_on_the_replica_that_caches_it(fleet: Fleet) -> None:
    prefix = "You are reviewing a long contract. " + " ".join(f"Clause {i} says the parties agree." for i in range(40))
    hits_before = sum(fleet.replica_series("phi4_replica_prefix_cache_hit_tokens").values())
    before = counts(fleet)
    for question in range(6):
        body = {"model": "microsoft/phi-4", "prompt": f"{prefix}\nQuestion {question}:", "max_tokens": 2}
        response = httpx.post(f"{fleet.url}/v1/completions", json=body, headers=fleet.headers, timeout=60)
        assert response.status_code == 200
    after = wait_reported(fleet, sum(before.values()) + 6)
    served = sorted(after[r] - before.get(r, 0) for r in after)
    assert served == [0, 6], "every request that shares the prefix went to the replica holding it"
    time.sleep(1.0)  # one more report
    hits = sum(fleet.replica_series("phi4_replica_prefix_cache_hit_tokens").values()) - hits_before
    prefix_tokens = httpx.post(f"{fleet.url}/tokenize", json={"prompt": prefix}, headers=fleet.headers).json()["count"]
    assert hits >= 5 * (prefix_tokens // 16 - 1) * 16  # the five after the first reused the cached blocks


def test_a_client_that_goes_away_aborts_its_request_on_the_replica(fleet: Fleet) -> None:
    tokens_before = sum(fleet.replica_series("phi4_replica_generation_tokens_total").values())
    body = {"model": "microsoft/phi-4", "prompt": "A very long story", "max_tokens": 800, "stream": True}
    with httpx.stream("POST", f"{fleet.url}/v1/completions", json=body, headers=fleet.headers, timeout=60) as r:
        for index, _ in enumerate(r.iter_lines()):
            if index == 10:
                break  # and the connection closes
    time.sleep(1.0)  # two reports after the disconnect
    deadline = time.monotonic() + 60
    while sum(fleet.replica_series("phi4_replica_num_requests_running").values()) > 0:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    generated = sum(fleet.replica_series("phi4_replica_generation_tokens_total").values()) - tokens_before
    assert generated < 800, "the replica stopped when the client left"


def thread_cpus(pid: int) -> set[tuple[int, ...]]:
    """The CPU sets the threads of a process may run on (one set when they all agree)."""
    return {tuple(sorted(os.sched_getaffinity(int(thread)))) for thread in os.listdir(f"/proc/{pid}/task")}


def assert_replicas_on_cores_of_their_own(fleet: Fleet) -> None:
    # a replica killed in the last few seconds is still listed (STALE_SECONDS): the live processes only
    replicas = [r for r in fleet.health()["replicas"] if r["healthy"] and Path(f"/proc/{r['pid']}").exists()]
    bound = [r["cpus"] for r in replicas if r["cpus"]]
    assert len({cpu for cpus in bound for cpu in cpus}) == sum(len(cpus) for cpus in bound), replicas  # disjoint
    if len(os.sched_getaffinity(0)) >= len(replicas):
        assert len(bound) == len(replicas), replicas  # a core each, where the machine has them
    for replica in replicas:
        if replica["cpus"]:
            assert thread_cpus(replica["pid"]) == {tuple(replica["cpus"])}, replica  # every thread, as reported


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="CPU affinity is Linux's")
def test_each_cpu_replica_runs_on_cores_of_its_own(fleet: Fleet) -> None:
    assert_replicas_on_cores_of_their_own(fleet)


SCHED_OTHER, SCHED_BATCH = 0, 3  # Linux's numbers, as /proc shows them


def session_threads(session: int) -> dict[int, list[tuple[str, int]]]:
    """pid -> (name, scheduling policy) of each of its threads, for every process of a session."""
    found: dict[int, list[tuple[str, int]]] = {}
    for process in Path("/proc").glob("[0-9]*"):
        try:
            stat = (process / "stat").read_text()
            if int(stat[stat.rindex(")") + 2 :].split()[3]) != session:
                continue
            threads = []
            for thread in (process / "task").iterdir():
                fields = (thread / "stat").read_text()
                policy = int(fields[fields.rindex(")") + 2 :].split()[38])
                threads.append(((thread / "comm").read_text().strip(), policy))
        except (OSError, ValueError):
            continue  # it ended meanwhile
        found[int(process.name)] = threads
    return found


def assert_only_engines_preempt(fleet: Fleet) -> None:
    """Every thread of the fleet (phi4, Ray's processes, HAProxy, the ingress, the replicas' I/O threads) is
    SCHED_BATCH, which does not preempt when it wakes, but each replica's engine thread."""
    replicas = {r["pid"] for r in fleet.health()["replicas"] if r["healthy"] and Path(f"/proc/{r['pid']}").exists()}
    threads = session_threads(fleet.process.pid)  # the fleet runs in a session of its own
    assert replicas and replicas <= threads.keys() and len(threads) > len(replicas) + 2, threads
    for pid, listed in threads.items():
        preempting = [(name, policy) for name, policy in listed if policy != SCHED_BATCH]
        assert preempting == ([("phi4-engine", SCHED_OTHER)] if pid in replicas else []), (pid, listed)


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="scheduling policies are Linux's")
def test_in_a_cpu_fleet_only_the_engines_preempt_when_they_wake(fleet: Fleet) -> None:
    assert_only_engines_preempt(fleet)


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="scheduling policies are Linux's")
def test_yielding_to_the_engine_covers_every_thread_and_those_started_after() -> None:
    # in a process of its own: the policy stays with the threads that take it
    script = """
import json, os, threading
from phi4.cluster.cpu_priority import yield_to_engines
stop = threading.Event()
engine = threading.Thread(target=stop.wait); engine.start()
helper = threading.Thread(target=stop.wait); helper.start()
assert yield_to_engines(engine.native_id)
later = threading.Thread(target=stop.wait); later.start()
print(json.dumps({name: os.sched_getscheduler(thread.native_id) for name, thread in
      [("main", threading.main_thread()), ("engine", engine), ("helper", helper), ("later", later)]}))
stop.set()
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"main": SCHED_BATCH, "engine": SCHED_OTHER, "helper": SCHED_BATCH,
                                         "later": SCHED_BATCH}


def test_a_replica_whose_binding_fails_runs_unbound_instead_of_failing(monkeypatch, caplog) -> None:  # noqa: ANN001
    from ray.serve.schema import ReplicaRank

    import phi4.cluster.replica

    def refuse(cpus: object) -> None:
        raise OSError(22, "Invalid argument")

    monkeypatch.setattr(phi4.cluster.replica, "bind_process", refuse)
    replica = phi4.cluster.replica.EngineReplica.__new__(phi4.cluster.replica.EngineReplica)
    replica.replica_id, replica.binding_share, replica.node_cpus, replica.cpus = "r1", 1.0, frozenset({0, 1}), []
    replica.engine = types.SimpleNamespace(shutdown=lambda: None)
    replica.reconfigure(None, ReplicaRank(rank=1, node_rank=0, local_rank=1))
    assert replica.cpus == [] and "left unbound" in caplog.text
    replica.reconfigure(None, ReplicaRank(rank=0, node_rank=0, local_rank=0))  # and it does not try again
    assert replica.cpus == []


def test_a_replica_killed_mid_stream_fails_only_its_requests_and_is_replaced(fleet: Fleet) -> None:
    pids = {r["pid"] for r in fleet.health()["replicas"] if r["healthy"]}
    assert len(pids) == 2
    results: list[str] = []
    started: set[int] = set()  # the streams that have received text

    async def stream(index: int) -> str:
        async with httpx.AsyncClient(timeout=120) as http:
            # Long answers: every stream is still running when the replica is killed, however fast the machine.
            body = {"model": "microsoft/phi-4", "prompt": f"Story {index}", "max_tokens": 900, "ignore_eos": True,
                    "stream": True}
            text = ""
            async with http.stream("POST", f"{fleet.url}/v1/completions", json=body, headers=fleet.headers) as r:
                async for line in r.aiter_lines():
                    text += line + "\n"
                    if line.startswith("data: {"):
                        started.add(index)
            return text

    async def run() -> None:
        # Four requests at once are split two and two (the router counts each at once), prompts too short
        # for prefix affinity; kill a replica once every stream has begun, so both hold two that are running.
        tasks = [asyncio.create_task(stream(i)) for i in range(4)]
        deadline = time.monotonic() + 60
        while len(started) < 4 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert len(started) == 4 and not any(task.done() for task in tasks)
        loads = {r["pid"]: r["running"] for r in fleet.health()["replicas"]}
        victim = max(loads, key=loads.get)
        os.kill(victim, signal.SIGKILL)
        results.extend(await asyncio.gather(*tasks))

    asyncio.run(run())
    failed = [r for r in results if '"error"' in r]
    completed = [r for r in results if '"error"' not in r]
    assert failed and completed, ("the dead replica's streams failed, the other's finished",
                                  [(r.count("data: {"), r[-300:]) for r in results])
    assert all(r.rstrip().endswith("data: [DONE]") for r in results)  # every stream ends properly
    assert all("replica serving this request stopped" in r for r in failed)
    deadline = time.monotonic() + 180  # Ray Serve starts a replacement, which reports under its own pid
    while not {r["pid"] for r in fleet.wait_healthy(2)["replicas"] if r["healthy"]} - pids:
        assert time.monotonic() < deadline, fleet.health()
        time.sleep(0.5)
    fleet.wait_healthy(2)
    if hasattr(os, "sched_getaffinity"):
        assert_replicas_on_cores_of_their_own(fleet)  # the replacement took the cores the dead replica left
    if hasattr(os, "SCHED_BATCH"):
        assert_only_engines_preempt(fleet)  # and yields to the engines as the dead one did
    body = {"model": "microsoft/phi-4", "prompt": "Still there?", "max_tokens": 4}
    assert httpx.post(f"{fleet.url}/v1/completions", json=body, headers=fleet.headers, timeout=60).status_code == 200


def test_the_chat_page_and_metrics_are_served_by_the_ingress(fleet: Fleet) -> None:
    assert "<title>phi4 chat</title>" in httpx.get(f"{fleet.url}/").text
    assert httpx.get(f"{fleet.url}/v1/models").status_code == 401  # the key holds for the whole deployment
    metrics = httpx.get(f"{fleet.url}/metrics").text
    assert "phi4_requests_total" in metrics and 'phi4_replica_up{replica="' in metrics


# The router on its own: the same workload with and without prefix affinity.

def router(imbalance: int = 8):  # noqa: ANN201
    from ray.serve._private.common import DeploymentHandleSource, DeploymentID

    from phi4.cluster.router import PrefixAffinityRouter

    instance = PrefixAffinityRouter(DeploymentID(name="EngineReplica", app_name="phi4"),
                                    DeploymentHandleSource.UNKNOWN)
    instance.initialize_state(block_size=16, imbalance=imbalance)
    return instance


def pending(tokens: list[int], request_id: str = "id"):  # noqa: ANN201 - what Ray Serve hands the router
    from concurrent.futures import Future

    from phi4.cluster.wire import WireRequest
    from phi4.sampling_params import SamplingParams

    return types.SimpleNamespace(args=[f"phi4-{request_id}", WireRequest(tokens, SamplingParams())], kwargs={},
                                 metadata=types.SimpleNamespace(internal_request_id=request_id), future=Future())


def idle_replica(name: str) -> types.SimpleNamespace:  # a RunningReplica whose last report holds nothing
    return types.SimpleNamespace(replica_id=name, routing_stats={"requests": [], "kv_free_blocks": 100})


def test_prefix_affinity_reuses_more_cache_than_least_loaded_routing() -> None:
    replicas = [idle_replica(f"r{i}") for i in range(2)]
    prefixes = [list(range(1000 * p, 1000 * p + 128)) for p in range(4)]  # four documents, 8 blocks each
    workload = [prefixes[i % 4] + [50_000 + i] * 5 for i in range(40)]

    def cached_blocks(route) -> int:  # noqa: ANN001
        held: dict[str, set[tuple[int, ...]]] = {"r0": set(), "r1": set()}
        reused = 0
        for tokens in workload:
            replica = route(tokens)
            blocks = {tuple(tokens[:end]) for end in range(16, len(tokens) + 1, 16)}
            reused += len(blocks & held[replica])
            held[replica] |= blocks
        return reused

    def choose(instance):  # noqa: ANN001, ANN202
        def route(tokens: list[int]) -> str:
            chosen = asyncio.run(instance.choose_replicas(replicas, pending(tokens, "request")))[0][0].replica_id
            instance.on_request_completed(chosen, "request")  # one at a time: each finishes before the next
            return chosen
        return route

    with_affinity = cached_blocks(choose(router()))
    without = cached_blocks(choose(router(imbalance=-1)))  # affinity never applies: power of two choices alone
    assert with_affinity == 36 * 8  # every document computed once, then always found
    assert without < with_affinity


def test_a_busy_replica_loses_its_prefixes_to_an_idle_one() -> None:
    from phi4.cluster.router import prefix_block_hashes

    # 35 requests on "busy", all sent by another router (this one never sent their ids)
    busy = types.SimpleNamespace(replica_id="busy", routing_stats={"requests": [f"x{i}" for i in range(35)]})
    idle = types.SimpleNamespace(replica_id="idle", routing_stats={"requests": []})
    instance = router(imbalance=8)
    tokens = list(range(64))
    instance._owners.update({block: "busy" for block in prefix_block_hashes(tokens, 16)})
    assert asyncio.run(instance.choose_replicas([busy, idle], pending(tokens)))[0][0] is idle


def test_the_replica_whose_requests_finished_gets_the_next_ones_before_its_next_report() -> None:
    # Both replicas last reported 4 requests; since then r0's finished. Reports come only every second or
    # so: routing on them alone would split new requests evenly and leave r0 with half the work of r1.
    replicas = [idle_replica(f"r{i}") for i in range(2)]
    instance = router()
    first = [asyncio.run(instance.choose_replicas(replicas, pending([i] * 20, f"a{i}")))[0][0].replica_id
             for i in range(8)]
    assert sorted(first) == ["r0"] * 4 + ["r1"] * 4  # in-flight requests count at once: a burst is split
    for i, replica in enumerate(first):
        if replica == "r0":
            instance.on_request_completed(replica, f"a{i}")
    later = [asyncio.run(instance.choose_replicas(replicas, pending([100 + i] * 20, f"b{i}")))[0][0].replica_id
             for i in range(4)]
    assert later == ["r0"] * 4

    cancelled = pending([7] * 20, "c")  # chosen, then the client left before Ray Serve sent it anywhere
    asyncio.run(instance.choose_replicas(replicas, cancelled))
    cancelled.future.cancel()
    assert [instance.load(r)[0] for r in replicas] == [4, 4]


def test_a_report_taken_before_a_replicas_requests_finished_does_not_count_them_again() -> None:
    # r0's report lists the 8 requests this router sent it, and arrives after they finished (reports lag by
    # up to their period): r0 is idle and must get the next requests, not look 8 requests busier than r1.
    r0, r1 = idle_replica("r0"), idle_replica("r1")
    instance = router()
    for i in range(8):
        asyncio.run(instance.choose_replicas([r0], pending([i] * 20, f"a{i}")))
    for i in range(4):
        asyncio.run(instance.choose_replicas([r1], pending([50 + i] * 20, f"b{i}")))
    r0.routing_stats = {"requests": [f"phi4-a{i}" for i in range(8)], "kv_free_blocks": 100}
    r1.routing_stats = {"requests": [f"phi4-b{i}" for i in range(4)], "kv_free_blocks": 100}
    for i in range(8):
        instance.on_request_completed("r0", f"a{i}")
    later = [asyncio.run(instance.choose_replicas([r0, r1], pending([100 + i] * 20, f"c{i}")))[0][0].replica_id
             for i in range(4)]
    assert later == ["r0"] * 4
    # A request in a report that this router never sent is another router's: it counts.
    r1.routing_stats = {"requests": [f"phi4-b{i}" for i in range(4)] + ["other-1", "other-2"], "kv_free_blocks": 100}
    assert [instance.load(r)[0] for r in (r0, r1)] == [4, 6]


def test_a_replica_that_stops_reporting_shows_unhealthy_and_is_then_forgotten() -> None:
    # Ray Serve's updates carry every replica's last routing stats, so a dead replica's old report keeps
    # coming until the controller drops it: only a new report (a new `at`) counts as the replica being alive.
    from phi4.cluster import fleet
    from phi4.engine.engine import EngineStats

    clock = [1000.0]
    view = fleet.FleetView(clock=lambda: clock[0])

    def report(replica: str, at: float, running: int) -> dict:
        stats = EngineStats(running, 0, 0.5, 10, 0, 0)
        return {**fleet.report_of(replica, "node-1", 7, [], stats, 3, 30, []), "at": at}

    for second in range(int(fleet.STALE_SECONDS) + 3):  # "a" reports every second; "b" once, at 0, then no more
        clock[0] = 1000.0 + second
        view.observe(report("a", second, running=2))
        view.observe(report("b", 0, running=5))
    health = view.health()
    assert health["status"] == "degraded" and health["healthy_replicas"] == 1
    assert {r["replica"]: r["healthy"] for r in health["replicas"]} == {"a": True, "b": False}
    assert view.totals().num_running == 2  # admission counts only the replicas that answer
    assert 'phi4_replica_up{replica="b",node="node-1"} 0' in view.render()
    clock[0] += fleet.FORGET_SECONDS
    view.observe(report("a", 99, running=1))
    assert [r["replica"] for r in view.health()["replicas"]] == ["a"]


def test_merged_outputs_read_as_the_outputs_one_after_another() -> None:
    from phi4.engine.request import RequestOutput, merge_outputs
    from phi4.engine.sampling import TokenLogprob

    def output(token: int, text: str, finished: bool = False, **extra: object) -> RequestOutput:
        return RequestOutput("r", [token], text, [TokenLogprob(token, -0.5, [])], finished,
                             "length" if finished else None, [1, 2, 3], token - 9, **extra)

    merged = merge_outputs([output(10, "Hel", prompt_logprobs=[None, None, None], num_cached_tokens=0),
                            output(11, "lo"), output(12, "!", finished=True, num_cached_tokens=0)])
    assert (merged.new_token_ids, merged.new_text, [lp.token_id for lp in merged.new_logprobs]) \
        == ([10, 11, 12], "Hello!", [10, 11, 12])
    assert merged.finished and merged.finish_reason == "length" and merged.num_output_tokens == 3
    assert merged.prompt_logprobs == [None, None, None] and merged.prompt_token_ids == [1, 2, 3]


def test_autoscaling_options_become_ray_serves_config() -> None:
    from phi4.cluster.options import ClusterOptions

    assert ClusterOptions(replicas=3).autoscaling is None  # a fixed count
    scaling = ClusterOptions(replicas=2, min_replicas=1, max_replicas=6, target_ongoing_requests=8).autoscaling
    assert scaling == {"min_replicas": 1, "max_replicas": 6, "initial_replicas": 2, "target_ongoing_requests": 8}
    with pytest.raises(ValueError, match="min <= max"):
        _ = ClusterOptions(min_replicas=4, max_replicas=2).autoscaling
    with pytest.raises(ValueError, match="unknown phi4 deployment arguments: colour"):
        ClusterOptions.from_args({"colour": "blue"})
    options = ClusterOptions.from_args(ClusterOptions(replicas=2).as_args())  # a round trip through plain data
    assert options == ClusterOptions(replicas=2)


def test_the_command_lines_replica_options_reach_the_deployment(monkeypatch, capsys) -> None:  # noqa: ANN001
    import phi4.cluster.app
    import phi4.cluster.options
    from phi4.cli import main

    started = []
    monkeypatch.setattr(phi4.cluster.options, "use_local_ray_serve_settings", lambda avoid: None)  # leave os.environ be
    monkeypatch.setattr(phi4.cluster.app, "serve_cluster", lambda options, *where: started.append(options) or 0)
    assert main(["serve", "--model", "demo", "--replicas", "3", "--cpus-per-replica", "2",
                 "--stream-interval-ms", "100"]) == 0
    options = started[0]
    assert (options.replicas, options.cpus_per_replica, options.stream_interval_ms) == (3, 2.0, 100.0)
    assert options.bind_cpus
    assert main(["serve", "--model", "demo", "--replicas", "2", "--no-bind-cpus"]) == 0
    assert not started[-1].bind_cpus
    with pytest.raises(SystemExit):
        main(["serve", "--model", "demo", "--replicas", "2", "--stream-interval-ms", "-5"])
    assert "--stream-interval-ms: -5: milliseconds from 0 to 10000" in capsys.readouterr().err


def test_a_serve_config_with_a_stream_interval_out_of_range_is_refused() -> None:
    from phi4.cluster.options import ClusterOptions

    for milliseconds in (-5, 20_000, float("nan")):
        with pytest.raises(ValueError, match="milliseconds from 0 to 10000"):
            ClusterOptions.from_args({"stream_interval_ms": milliseconds})


def test_the_kuberay_manifest_runs_the_builder_the_cli_runs() -> None:
    import yaml

    from phi4.cluster.app import ENTRY_POINT, build
    from phi4.cluster.options import ClusterOptions

    for path, config in ((DEPLOY / "rayservice.yaml", "serveConfigV2"), (DEPLOY / "serve-config.yaml", None)):
        document = yaml.safe_load(path.read_text())
        serve_config = yaml.safe_load(document["spec"][config]) if config else document
        (application,) = serve_config["applications"]
        assert application["import_path"] == ENTRY_POINT
        module, name = ENTRY_POINT.split(":")
        assert getattr(__import__(module, fromlist=[name]), name) is build
        options = ClusterOptions.from_args(application["args"])  # every argument is one the CLI can set
        assert options.model == "microsoft/phi-4" and options.replicas >= 2
    document = yaml.safe_load((DEPLOY / "rayservice.yaml").read_text())
    assert document["kind"] == "RayService" and document["apiVersion"] == "ray.io/v1"
    workers = document["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert workers["resources"]["limits"]["nvidia.com/gpu"] == "1"

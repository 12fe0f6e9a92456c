"""``python -m bench.forward``: forwarding throughput and recovery (issue 13, API.md §9).

For each engine (NATS JetStream, MQTT via mosquitto) on real loopback brokers:

* events/s forwarded at window 1, 16, 64, 128, direct and through a proxy adding 20 ms
  round trip (the rate of the cursor over a few seconds of a 100,000-event backlog);
* catch-up time of a 100,000-event backlog at window 64 (filled by SQL before the start;
  for MQTT also without the local subscriber);
* RSS the engine adds (VmRSS after the catch-up, minus the same gateway without forwarding),
  and CPU seconds per 100,000 events during the catch-up;
* time from a broker restart to the first ack.

``--floor`` runs only the catch-up of a backlog, alternating in one run the gateway (its
default ledger sync, window 64) and the floor: a plain client publishing the same messages
with the same window (nats-py with PubAcks on a reply inbox and ``Nats-Msg-Id``; paho QoS 1
with ``max_inflight_messages`` = window), no subscriber on this box; medians of ``--runs``
pairs and their ratio (issue 23: the gateway at or above the floor). The gateway's time
runs from a status poll to its last ack (``last_ack_at``), as the floor's runs to its last.

``--in-process`` runs only the catch-up, with the ``Forwarder`` and the real engine in this
process (real ledger file, real broker, uvloop), and reports the process's CPU seconds and
its loop thread's: the figure that judged each catch-up change, without a gateway, HTTP
polls or a subscriber around it.

Needs nats-server and mosquitto (``.ci/run`` installs them) and the ``nats``/``mqtt`` extras.
Prints one JSON object; bench/README.md keeps the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the broker fixtures
from brokers import Mosquitto, MqttSubscriber, Nats, Proxy  # noqa: E402
from conftest import Gateway, start_gateway  # noqa: E402
from test_forward_brokers import fill_db, forward_env, status  # noqa: E402

from .proc import MIB, cpu_seconds, rss_bytes  # noqa: E402

BACKLOG = 100_000
RATE_SECONDS = 3.0


def broker(kind: str, tmp: Path) -> Any:
    if kind == "nats":
        b = Nats(tmp).start()
        b.add_stream()
        return b
    return Mosquitto(tmp).start()


def process_cpu() -> float:
    """CPU seconds of this process, all its threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def poll(gw: Gateway) -> dict[str, Any]:
    """The forwarder's status."""
    for _ in range(50):  # a busy 2-core box may reset one poll; the next one answers
        try:
            return status(gw)
        except OSError:
            time.sleep(0.05)
    return status(gw)


def acked(gw: Gateway) -> int:
    return poll(gw)["acked_seq"]


def wait_acked(gw: Gateway, at_least: int, timeout: float = 300) -> float:
    start = time.monotonic()
    while acked(gw) < at_least:
        if time.monotonic() - start > timeout:
            raise RuntimeError(f"stuck at {status(gw)}")
        time.sleep(0.01)
    return time.monotonic() - start


def gateway(tmp: Path, url: str, window: int, name: str, backlog: int, sync: str = "normal") -> Gateway:
    run = tmp / name
    run.mkdir()
    fill_db(run / "gw.db", backlog)
    return start_gateway(run, forward_env(url, EDGELINK_FORWARD_WINDOW=str(window), EDGELINK_LEDGER_SYNC=sync))


def rate(tmp: Path, url: str, window: int, name: str) -> float:
    gw = gateway(tmp, url, window, name, BACKLOG)
    try:
        wait_acked(gw, 1)
        first, t0 = acked(gw), time.monotonic()
        time.sleep(RATE_SECONDS)
        return (acked(gw) - first) / (time.monotonic() - t0)
    finally:
        gw.stop(signal.SIGKILL)


def engine_figures(kind: str, root: Path, rates: bool = True) -> dict[str, Any]:
    tmp = root / kind
    tmp.mkdir()
    b = broker(kind, tmp)
    consumer = None
    out: dict[str, Any] = {}
    try:
        if kind == "mqtt":
            # first with no subscriber on this box: the test subscriber (paho, on this
            # box's 2 cores) burns about as much CPU as the gateway; a central consumer
            # runs elsewhere
            gw = gateway(tmp, b.url, 64, "alone", BACKLOG)
            out["catch_up_100k_s_no_local_subscriber"] = round(wait_acked(gw, BACKLOG), 2)
            gw.stop(signal.SIGKILL)
            consumer = MqttSubscriber(b)
        if rates:
            proxy = Proxy(b.port, delay=0.010)  # 10 ms each way
            scheme = "nats" if kind == "nats" else "mqtt"
            for window in (1, 16, 64, 128):
                out[f"events_per_s_w{window}"] = round(rate(tmp, b.url, window, f"r{window}"))
                out[f"events_per_s_w{window}_20ms"] = round(rate(tmp, f"{scheme}://{proxy.port_url}", window,
                                                                 f"d{window}"))
            proxy.close()

        base_dir = tmp / "base"
        base_dir.mkdir()
        fill_db(base_dir / "gw.db", BACKLOG)
        base = start_gateway(base_dir, {"EDGELINK_LEDGER_SYNC": "normal"})
        time.sleep(0.5)
        base_rss = rss_bytes(base.proc.pid)
        base.stop()

        gw = gateway(tmp, b.url, 64, "catchup", BACKLOG)
        cpu0 = cpu_seconds(gw.proc.pid)
        out["catch_up_100k_s"] = round(wait_acked(gw, BACKLOG), 2)
        out["cpu_s_per_100k"] = round((cpu_seconds(gw.proc.pid) - cpu0) * 100_000 / BACKLOG, 2)
        out["rss_added_mib"] = round((rss_bytes(gw.proc.pid) - base_rss) / MIB, 1)

        b.kill(signal.SIGKILL)
        gw.post("/events/ingest", {"source": "bench", "type": "fleet.live", "payload": {}})
        time.sleep(2.0)  # the forwarder is in backoff now
        t0 = time.monotonic()
        b.start()
        wait_acked(gw, BACKLOG + 1, timeout=60)
        out["restart_to_first_ack_s"] = round(time.monotonic() - t0, 2)
        gw.stop()
    finally:
        if consumer is not None:
            consumer.close()
        b.kill()
    return out


def in_process(kind: str, root: Path, window: int, runs: int) -> dict[str, Any]:
    """Median catch-up of BACKLOG events with the forwarder in this process (``kind``:
    nats, mqtt, or mqtt5 for the URL path /5)."""
    import uvloop

    from edgelink import forward
    from edgelink.config import load_settings
    from edgelink.forward.forwarder import Forwarder
    from edgelink.gateway.metrics import Registry
    from edgelink.ledger import Ledger

    tmp = root / kind
    tmp.mkdir()
    b = broker("nats" if kind == "nats" else "mqtt", tmp)
    url = b.url + ("/5" if kind == "mqtt5" else "")
    settings = load_settings({"EDGELINK_FORWARD_URL": url, "EDGELINK_EDGE_ID": "box1", "ENABLE_AUTH": "false"})

    async def catch_up(db: Path) -> tuple[float, float, float, int]:
        ledger = Ledger(str(db), sync="normal")
        await ledger.start()
        fw = Forwarder(ledger, lambda: forward.open_engine(settings), Registry(), engine=kind, url=url,
                       edge_id="box1", window=window, ack_timeout=10)
        t0, cpu0, loop0 = time.monotonic(), process_cpu(), time.thread_time()
        await fw.start()
        while fw.acked_seq < BACKLOG:
            await asyncio.sleep(0.005)
        figures = (time.monotonic() - t0, process_cpu() - cpu0, time.thread_time() - loop0, ledger.commits)
        await fw.stop()
        await ledger.close()
        return figures

    results = []
    try:
        for i in range(runs):
            fill_db(tmp / f"gw{i}.db", BACKLOG)
            results.append(uvloop.run(catch_up(tmp / f"gw{i}.db")))
    finally:
        b.kill()
    wall, cpu, loop_cpu, commits = (statistics.median(column) for column in zip(*results))
    return {"window": window, "runs": runs, "catch_up_100k_s": round(wall, 2),
            "catch_up_100k_s_each": [round(r[0], 2) for r in results],
            "cpu_s_per_100k": round(cpu * 100_000 / BACKLOG, 2),
            "loop_thread_cpu_s_per_100k": round(loop_cpu * 100_000 / BACKLOG, 2),
            "writer_commits": int(commits)}  # cursor writes on the loop (the usual case) are not among them


def floor_nats(url: str, bodies: list[tuple[str, bytes, str]], window: int) -> float:
    """Seconds for a plain nats-py publisher to have ``bodies`` acked by the stream, at
    most ``window`` unacked: the same publish, reply inbox and header as the gateway's."""
    import nats

    async def go() -> float:
        nc = await nats.connect(url)
        inbox = nc.new_inbox()
        free = asyncio.Semaphore(window)
        done = asyncio.Event()
        acks = 0

        async def on_ack(msg: Any) -> None:
            nonlocal acks
            acks += 1
            free.release()
            if acks == len(bodies):
                done.set()

        await nc.subscribe(inbox + ".*", cb=on_ack, pending_msgs_limit=-1)
        t0 = time.monotonic()
        for i, (subject, body, msg_id) in enumerate(bodies):
            await free.acquire()
            await nc.publish(subject, body, reply=f"{inbox}.{i}", headers={"Nats-Msg-Id": msg_id})
        await done.wait()
        elapsed = time.monotonic() - t0
        await nc.close()
        return elapsed

    return asyncio.run(go())


def floor_mqtt(port: int, bodies: list[tuple[str, bytes, str]], window: int) -> float:
    """Seconds for a plain paho QoS 1 client to have ``bodies`` PUBACKed, at most
    ``window`` in flight (paho's own bound)."""
    import threading

    import paho.mqtt.client as mqtt
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="floor", clean_session=True)
    client.max_inflight_messages_set(window)
    client.max_queued_messages_set(0)
    finished = threading.Event()
    acks = [0]

    def on_publish(*_: Any) -> None:
        acks[0] += 1
        if acks[0] == len(bodies):
            finished.set()

    client.on_publish = on_publish
    client.connect("127.0.0.1", port, 30)
    client.loop_start()
    t0 = time.monotonic()
    for subject, body, _ in bodies:
        client.publish(subject.replace(".", "/", 3), body, qos=1)
    finished.wait(600)
    elapsed = time.monotonic() - t0
    client.loop_stop()
    client.disconnect()
    return elapsed


def gateway_rate(gw: Gateway, backlog: int, broker_pid: int) -> tuple[float, float, float]:
    """Events/s the gateway's broker acked, from the first status poll (its wall clock
    before the poll, and the acked seq the poll read) to the last ack (the status's
    ``last_ack_at``, the gateway's own wall clock). Polls every 50 ms: the end is not a
    poll's time, so sparse polls take less CPU from the catch-up without blurring it.
    With it, the CPU seconds per event of the gateway and of the broker over the same span
    (to the poll that saw the backlog acked)."""
    t0, cpu0, broker0 = time.time(), cpu_seconds(gw.proc.pid), cpu_seconds(broker_pid)
    first = acked(gw)
    while (st := poll(gw))["acked_seq"] < backlog:
        time.sleep(0.05)
    events = backlog - first
    return (events / (st["last_ack_at"] / 1000 - t0), (cpu_seconds(gw.proc.pid) - cpu0) / events,
            (cpu_seconds(broker_pid) - broker0) / events)


def floor_pairs(kind: str, root: Path, runs: int, backlog: int, window: int = 64) -> dict[str, Any]:
    """``runs`` pairs of (gateway, floor) catch-ups of ``backlog`` events, alternating."""
    tmp = root / f"floor-{kind}"
    tmp.mkdir()
    b = broker(kind, tmp)
    # the gateway's messages: the same subject, body and id for the floor
    bodies = [("vx11.box1.events.fleet.test",
               orjson.dumps({"edge_id": "box1", "epoch": "0" * 32, "seq": i, "event_id": f"e{i}", "type": "fleet.test",
                             "source": "fill", "timestamp": int(time.time() * 1000), "payload": {"i": i},
                             "metadata": None, "canonical": False}), f"floor:{run_id}:{i}")
              for run_id in ("x",) for i in range(1, backlog + 1)]
    gateway_rates, floor_rates = [], []
    cpu: dict[str, list[float]] = {"gateway": [], "floor": [], "broker_gateway": [], "broker_floor": []}
    assert b.proc is not None  # started
    try:
        for run in range(runs):
            gw = gateway(tmp, b.url, window, f"g{run}", backlog, sync="full")  # the default
            try:
                rate, own, broker_cpu = gateway_rate(gw, backlog, b.proc.pid)
            finally:
                gw.stop(signal.SIGKILL)
            gateway_rates.append(rate)
            cpu["gateway"].append(own)
            cpu["broker_gateway"].append(broker_cpu)
            run_bodies = [(subject, body, msg_id.replace(":x:", f":{run}:")) for subject, body, msg_id in bodies]
            # the floor runs in this process (paho's network loop in a thread of it)
            mine0, broker0 = process_cpu(), cpu_seconds(b.proc.pid)
            seconds = floor_nats(b.url, run_bodies, window) if kind == "nats" else floor_mqtt(b.port, run_bodies, window)
            floor_rates.append(backlog / seconds)
            cpu["floor"].append((process_cpu() - mine0) / backlog)
            cpu["broker_floor"].append((cpu_seconds(b.proc.pid) - broker0) / backlog)
    finally:
        b.kill()
    g, f = statistics.median(gateway_rates), statistics.median(floor_rates)
    return {"window": window, "backlog": backlog, "runs": runs,
            "gateway_events_per_s": round(g), "floor_events_per_s": round(f), "ratio": round(g / f, 2),
            "gateway_each": [round(r) for r in gateway_rates], "floor_each": [round(r) for r in floor_rates],
            # medians, CPU seconds per 100,000 events: the client's own and the broker's
            **{f"cpu_s_per_100k_{k}": round(statistics.median(v) * 100_000, 2) for k, v in cpu.items()}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", choices=("nats", "mqtt", "mqtt5", "both"), default="both")
    parser.add_argument("--skip-rates", action="store_true", help="only catch-up, RSS, CPU and restart")
    parser.add_argument("--in-process", action="store_true",
                        help="only the catch-up, the forwarder in this process (see above); --engine may be mqtt5")
    parser.add_argument("--floor", action="store_true",
                        help="only the catch-up, gateway and plain client alternating (see above)")
    parser.add_argument("--backlog", type=int, default=BACKLOG, help="--floor: events per catch-up")
    parser.add_argument("--runs", type=int, default=3, help="--in-process, --floor: runs to take the median of")
    parser.add_argument("--window", type=int, default=64, help="--in-process: the forwarding window")
    args = parser.parse_args()
    if args.engine == "mqtt5" and not args.in_process:
        parser.error("--engine mqtt5 goes with --in-process")
    kinds = ("nats", "mqtt") if args.engine == "both" else (args.engine,)
    with tempfile.TemporaryDirectory() as root:
        if args.in_process:
            figures = {kind: in_process(kind, Path(root), args.window, args.runs) for kind in kinds}
        elif args.floor:
            figures = {kind: floor_pairs(kind, Path(root), args.runs, args.backlog, args.window) for kind in kinds}
        else:
            figures = {kind: engine_figures(kind, Path(root), not args.skip_rates) for kind in kinds}
    print(orjson.dumps(figures, option=orjson.OPT_INDENT_2).decode())
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Flower's two ways to run a simulation, side by side in one run, on the same small apps:

  run_simulation - `flwr.simulation.run_simulation` in a fresh process, with fedmilm's fix to
                   Flower's message dispatch installed, as fedmilm-simulate runs it
                   (deprecated in Flower 1.42);
  flwr run       - what Flower 1.42 recommends: `flower-superlink --simulation` (started here, on
                   a private port) and `flwr run APP CONNECTION --federation-config ...`.

The apps send an adapter-sized float32 array (1.87 MB: the default model's global part) to a
sampled cohort each round and get it back; no training, so what is measured is Flower's
own cost per round and at start-up. `flwr run` starts the simulation in Flower's own
`flwr-simulation` process, where fedmilm cannot install its dispatch fix (nor its private Ray
settings). Medians over --repeats. Writes BENCHMARKS.md (section per --nodes).

    python benchmarks/simulation_paths.py [--nodes 20] [--cohort 5] [--rounds 5] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from fedmilm.runtime import quiet_offline_env

quiet_offline_env()

from _common import machine, median, write_section  # noqa: E402

from fedmilm.deploy.local import _tool, child_env, cli_config  # noqa: E402
from fedmilm.deploy.processes import ProcessGroup, free_port, wait_for_port  # noqa: E402

FLOATS = 467_968  # float32 values of the default model's global adapter part (1.87 MB)

APPS = textwrap.dedent('''
    """Toy apps: an adapter-sized array out to a cohort and back, each round timed."""
    import json
    import random
    import time
    from pathlib import Path

    import numpy as np
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp


    def rounds(grid, rounds, cohort, floats, out):
        arrays = ArrayRecord([np.zeros(floats, dtype=np.float32)])
        while len(list(grid.get_node_ids())) < cohort:
            time.sleep(0.1)
        nodes, rng, times = sorted(grid.get_node_ids()), random.Random(0), []
        for _ in range(rounds):
            started = time.perf_counter()
            sent = [Message(RecordDict({"a": arrays}), dst_node_id=n, message_type="train")
                    for n in rng.sample(nodes, cohort)]
            replies = list(grid.send_and_receive(sent, timeout=600))
            if len(replies) != cohort or any(r.has_error() for r in replies):
                raise RuntimeError("a toy round lost replies")
            times.append(time.perf_counter() - started)
        Path(out).write_text(json.dumps(times))


    server = ServerApp()


    @server.main()
    def main(grid, context):
        c = context.run_config
        rounds(grid, int(c["rounds"]), int(c["cohort"]), int(c["floats"]), str(c["out"]))


    client = ClientApp()


    @client.train()
    def train(msg, context):
        content = RecordDict({"a": msg.content.array_records["a"],
                              "m": MetricRecord({"n": 1})})
        return Message(content, reply_to=msg)
''')

PYPROJECT = textwrap.dedent('''
    [project]
    name = "fedmilm-bench-toy"
    version = "1.0.0"

    [tool.flwr.app]
    publisher = "fedmilm"

    [tool.flwr.app.components]
    serverapp = "toyapp:server"
    clientapp = "toyapp:client"

    [tool.flwr.app.config]
    rounds = 1
    cohort = 1
    floats = 1
    out = ""
''')


def in_process(app_dir: Path, nodes: int, cohort: int, rounds: int, out: Path) -> float:
    """run_simulation in a fresh Python (as fedmilm-simulate runs it); wall seconds."""
    code = (f"import sys; sys.path.insert(0, {str(app_dir)!r})\n"
            "from flwr.serverapp import ServerApp\n"
            "from flwr.simulation import run_simulation\n"
            "from fedmilm.cli import flower_engine\n"
            "flower_engine.install()\n"
            "import toyapp\n"
            "server = ServerApp()\n"
            "@server.main()\n"
            "def main(grid, context):\n"
            f"    toyapp.rounds(grid, {rounds}, {cohort}, {FLOATS}, {str(out)!r})\n"
            f"run_simulation(server_app=server, client_app=toyapp.client, "
            f"num_supernodes={nodes}, backend_config={{'client_resources': "
            f"{{'num_cpus': 1, 'num_gpus': 0.0}}, 'init_args': {{'address': 'local', "
            f"'logging_level': 'ERROR', 'include_dashboard': False}}}})\n")
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=child_env(), timeout=900)
    if done.returncode != 0:
        raise SystemExit(f"run_simulation failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - started


def with_flwr_run(app_dir: Path, nodes: int, cohort: int, rounds: int, out: Path,
                  work: Path) -> tuple[float, float]:
    """A simulation SuperLink of our own, then `flwr run`; (SuperLink start-up s, run s)."""
    port = free_port()
    env = child_env()
    processes = ProcessGroup(env=env, log_dir=work / "logs")
    home = work / "cli-home"
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(cli_config(f"127.0.0.1:{port}", None))
    try:
        started = time.perf_counter()
        link = processes.start("superlink", [
            _tool("flower-superlink"), "--simulation", "--insecure", "--host", "127.0.0.1",
            "--port", str(port), "--disable-runtime-dependency-installation"],
            extra_env={"FLWR_HOME": str(work / "superlink-home")})
        wait_for_port(link, "127.0.0.1", port, 120)
        link_s = time.perf_counter() - started
        started = time.perf_counter()
        done = subprocess.run(
            [_tool("flwr"), "run", str(app_dir), "fedmilm", "--stream",
             "--run-config", f"rounds={rounds} cohort={cohort} floats={FLOATS} out='{out}'",
             "--federation-config", f"num-supernodes={nodes} client-resources-num-cpus=1"],
            capture_output=True, text=True, env={**env, "FLWR_HOME": str(home)}, timeout=900)
        run_s = time.perf_counter() - started
        if done.returncode != 0 or not out.exists():
            raise SystemExit(f"flwr run failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
        return link_s, run_s
    finally:
        processes.stop_all()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=20)
    parser.add_argument("--cohort", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    results: dict[str, dict[str, list[float]]] = {"run_simulation": {}, "flwr run": {}}
    with tempfile.TemporaryDirectory(prefix="fedmilm-paths-") as tmp:
        work = Path(tmp)
        app = work / "app"
        app.mkdir()
        (app / "pyproject.toml").write_text(PYPROJECT)
        (app / "toyapp.py").write_text(APPS)
        for repeat in range(args.repeats):  # alternated, so drift hits both alike
            out = work / f"a{repeat}.json"
            wall = in_process(app, args.nodes, args.cohort, args.rounds, out)
            rounds = json.loads(out.read_text())
            for key, value in (("wall", wall), ("round", median(rounds))):
                results["run_simulation"].setdefault(key, []).append(value)
            out = work / f"b{repeat}.json"
            link_s, run_s = with_flwr_run(app, args.nodes, args.cohort, args.rounds, out,
                                          work / f"b{repeat}")
            rounds = json.loads(out.read_text())
            for key, value in (("wall", link_s + run_s), ("round", median(rounds))):
                results["flwr run"].setdefault(key, []).append(value)
            print(json.dumps(results), flush=True)
    a, b = results["run_simulation"], results["flwr run"]
    lines = [
        f"## Flower's two simulation paths, {args.nodes} nodes: `run_simulation` vs `flwr run`",
        "",
        f"Command: `python benchmarks/simulation_paths.py --nodes {args.nodes} --cohort "
        f"{args.cohort} --rounds {args.rounds} --repeats {args.repeats}`",
        f"Machine: {machine()}. {args.nodes} virtual nodes, {args.cohort} per round, a "
        f"{FLOATS * 4 / 1e6:.2f} MB array out and back, no training; medians of "
        f"{args.repeats} alternated runs.",
        "",
        "| path | end to end s (incl. start-up) | s per round | round vs run_simulation |",
        "| --- | ---: | ---: | ---: |",
        f"| `run_simulation` (fedmilm-simulate) | {median(a['wall']):.1f} | "
        f"{median(a['round']):.2f} | 1.00x |",
        f"| `flower-superlink --simulation` + `flwr run` | {median(b['wall']):.1f} | "
        f"{median(b['round']):.2f} | {median(b['round']) / median(a['round']):.2f}x |",
    ]
    write_section(f"simulation-paths-{args.nodes}", "\n".join(lines))


if __name__ == "__main__":
    main()

"""`tokenfactory bench agents` end to end on small settings, and its workload."""

from __future__ import annotations

from pathlib import Path

from tokenfactory.bench.agents_bench import write_manifests
from tokenfactory.cli import main


def test_each_agent_gets_its_own_manifest_in_its_task_and_in_the_folder(tmp_path: Path):
    tasks = write_manifests(tmp_path / "m", num_agents=3, num_lines=5, seed=1)
    files = sorted((tmp_path / "m").iterdir())
    assert [f.name for f in files] == ["manifest-000.txt", "manifest-001.txt", "manifest-002.txt"]
    for task, file in zip(tasks, files):
        manifest = file.read_text().strip()
        assert len(manifest.splitlines()) == 5 and manifest in task
    assert len(set(tasks)) == 3
    assert write_manifests(tmp_path / "again", num_agents=3, num_lines=5, seed=1) == tasks  # seeded


def test_bench_agents_compares_kv_affinity_with_round_robin(tiny_model_dir, capsys):
    argv = ["bench", "agents", "--model", str(tiny_model_dir), "--workers", "2", "--agents", "2", "--turns", "2",
            "--manifest-lines", "4", "--num-blocks", "256"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    runs = [line for line in lines
            if line.startswith(("kv + session affinity: ", "round robin: ")) and "requests" in line]
    assert len(runs) == 2
    # Every agent's first turn spawned 1-3 sub-agents of 2 turns: 2 agents x 2 turns, plus theirs.
    assert all(int(line.split(": ")[1].split()[0]) >= 2 * 2 + 2 * 2 for line in runs)
    spawned = lines[-4].removeprefix("sub-agents spawned: ").split(", ")
    assert [s.rsplit(" ", 1)[0] for s in spawned] == ["kv + session affinity", "round robin"]
    assert all(2 <= int(s.rsplit(" ", 1)[1]) <= 4 for s in spawned)  # 1-2 each (--subagents 2)
    assert lines[-3].startswith("prefix-cache hits, kv + affinity / round robin:")
    assert lines[-2].startswith("goal >= 70% of prompt tokens cached")
    assert lines[-1].startswith("goal >= 2x round robin")

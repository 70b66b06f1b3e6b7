"""Summarise a demo run: each task's validation loss before and after, and answers to held-out prompts."""

import argparse
import json
from collections import defaultdict
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run", type=Path, help="the run's output_dir (holds metrics.jsonl)")
    parser.add_argument("answers", type=Path, help="output of `mftune generate` on held-out records")
    args = parser.parse_args()

    rows = [json.loads(line) for line in (args.run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "valid/loss" in r]
    first, last = evals[0], evals[-1]
    tasks = sorted({k.split("/")[1] for k in last if k.startswith("valid/") and k.count("/") == 2})
    print(f"validation loss per task, step {first['step']} -> step {last['step']}:")
    for task in tasks:
        before, after = first[f"valid/{task}/loss"], last[f"valid/{task}/loss"]
        accuracy = last[f"valid/{task}/accuracy"]
        print(f"  {task:16s} {before:6.3f} -> {after:6.3f}   token accuracy {accuracy:.1%}")

    by_task = defaultdict(list)
    for line in args.answers.read_text().splitlines():
        record = json.loads(line)
        by_task[record["task"]].append(record)
    print("\nheld-out prompts (greedy decoding, exact match):")
    for task, records in sorted(by_task.items()):
        hits = sum(r["output"].strip() == r["answer"].strip() for r in records)
        print(f"  {task:16s} {hits}/{len(records)} exact")
    for task, records in sorted(by_task.items()):
        r = records[0]
        print(f"\n[{task}] {r['messages'][-1]['content']}")
        print(f"  expected: {r['answer']}")
        print(f"  model:    {r['output']}")


if __name__ == "__main__":
    main()

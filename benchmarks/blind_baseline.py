"""How well a blind guesser passes the questions a prepare config makes: no ECG, no model.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/blind_baseline.py --config configs/prepare_demo.yaml
    PYTHONPATH=$PWD .venv/bin/python benchmarks/blind_baseline.py --config configs/prepare_demo.yaml \
        mcq.distractors=knowledge_base mcq.hard_fraction=0.5 'balanced_splits=[]'  (the study's style)
    PYTHONPATH=$PWD .venv/bin/python benchmarks/blind_baseline.py --config configs/prepare_demo.yaml \
        'sources=[{root: ../shared/data/ecg}]'                    (the shared real records)

It does what ``ecgvlm prepare`` does up to the questions (read every source, window MIT-BIH,
split patient-wise, count each data set's finding prevalence, ``make_mcq`` per unit) without
rendering, then scores the blind baseline of ``ecgvlm evaluate``
(``metrics.option_prior_baseline``: the offered option whose finding is most frequent among
the training split's correct answers) on the held-out splits, per data set, next to chance
(1 / number of options) and next to the share of the most frequent correct answer: a guesser
who knows the prior is right at least that often (it picks that finding whenever offered,
and it is offered whenever it is the answer), whatever the distractors. Reading runs in one
process; MIT-BIH's 30-min records take longest.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter, defaultdict


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="a prepare YAML, e.g. configs/prepare_demo.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the prepare config")
    args = parser.parse_args(argv)

    import numpy as np

    from ecgvlm.config import load_config
    from ecgvlm.dataset import (
        PrepareConfig,
        Unit,
        _unit_from_json,
        assign_splits,
        balance_answers,
        distractor_weights,
        list_sources,
        scan_path,
    )
    from ecgvlm.mcq import McqError, make_mcq
    from ecgvlm.metrics import option_prior_baseline
    from ecgvlm.records import EcgRecord

    config = load_config(PrepareConfig, args.config, args.overrides)
    units: list[Unit] = []
    for item in list_sources(config):
        rows = scan_path({"path": item["path"], "dataset": item["dataset"]}, config.window_s)
        units += [_unit_from_json(r["unit"]) for r in rows if r["unit"]]
    split_units, _ = balance_answers(assign_splits(sorted(units, key=Unit.sort_key), config),
                                     config)
    weights = distractor_weights(split_units, config)
    questions: dict[str, list[dict]] = defaultdict(list)
    for split, members in split_units.items():
        for u in members:
            # make_mcq reads the record's id and labels only: no signal is needed.
            rec = EcgRecord(record_id=u.record_id, dataset=u.dataset,
                            signal_mv=np.zeros((0, 1), dtype=np.float32), fs_hz=1.0,
                            leads=("-",), labels=u.labels, patient_id=u.patient_id or None,
                            start_s=u.start_s)
            for k in range(config.questions_per_record):
                try:
                    s = make_mcq(rec, config.seed + k, config.mcq,
                                 weights[split].get(u.dataset))
                except McqError:
                    continue
                questions[split].append({"sample_id": s.sample_id, "dataset": s.dataset,
                                         "option_labels": list(s.option_labels),
                                         "true_label": s.option_labels[s.answer_index]})
    train = questions.get("train", [])
    held_out = [q for split in config.splits if split != "train" for q in questions[split]]
    pred = option_prior_baseline(held_out, train, seed=config.seed)
    print(f"mcq: {json.dumps({'distractors': config.mcq.distractors, 'hard_fraction': config.mcq.hard_fraction, 'n_options': config.mcq.n_options})}; balanced_splits: {config.balanced_splits}")
    print(f"train questions: {len(train)}; held-out (val+test) questions: {len(held_out)}")
    print("| data set | held-out n | chance | top answer's share | blind baseline accuracy |")
    print("|---|---|---|---|---|")
    total_hit = 0
    for ds in sorted({q["dataset"] for q in held_out}):
        rows = [q for q in held_out if q["dataset"] == ds]
        hits = sum(pred[q["sample_id"]] == q["true_label"] for q in rows)
        total_hit += hits
        top = max(Counter(q["true_label"] for q in rows).values()) / len(rows)
        print(f"| {ds} | {len(rows)} | {1 / config.mcq.n_options:.3f} | {top:.3f} | {hits / len(rows):.3f} |")
    if held_out:
        top = max(Counter(q["true_label"] for q in held_out).values()) / len(held_out)
        print(f"| all | {len(held_out)} | {1 / config.mcq.n_options:.3f} | {top:.3f} | "
              f"{total_hit / len(held_out):.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

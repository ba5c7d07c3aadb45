"""Studies: analyses that read a finished attnpipe dataset and write their results beside it.

A study never changes the dataset: it reads committed tables through the read API
(`attnpipe.read.open_dataset`) and writes to a folder of its own.

    grounding.py   `attnpipe study grounding`: Lookback Lens span features, a logistic-regression
                   detector of ungrounded spans with cross-validated AUROC, and label-free scores
    labels.py      the span labels file (CSV or JSON Lines) and its mapping onto generated steps
    steps.py       the grounding and generations tables as per-step arrays, and span means of them
    results.py     the study's output folder: summary, scores, detector file and plot
    distill.py     `attnpipe study distill`: teacher vs student attention, KL/JS per layer pair,
                   best, monotone and uniform layer mappings
    align.py       two tokenizations of one text on their common character spans; pooling
    attention_runs.py  a run's maps or edges as (layer, head, query_pos, key_pos) arrays per window
    distill_results.py the distill study's output folder: tables, summary and heatmap
    export_distill.py  `attnpipe export distill`: teacher targets (dense, sparse top-k, sampled)
"""

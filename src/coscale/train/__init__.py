"""Training: the loop behind ``coscale train`` and the pieces it is made of, in the order a run uses them.

- ``config``         ``TrainConfig`` and its checks (no torch: bad numbers are reported at once)
- ``run_dir``        the run directory: layout, its state (a run, its checkpoints), ``--out`` checks,
                     umask-honouring writes and one-line write errors (no torch)
- ``data``           byte tokenizer, embedded corpus, text / ``.bin`` token files, split, unigram entropy,
                     resumable random-window batches
- ``setup``          the world (one process or EP x DP), the run plan (every check before a write), the
                     model with its initial (``--init-from``) or resumed state, optimizer and sampler
- ``optim``          AdamW with FP32 master weights and FP32 or BF16 moments
- ``schedule``       linear warm-up + cosine learning rate
- ``step``           one training step and the held-out evaluation: device tensors in and out, no host sync
- ``balance``        expert-load balance: MaxVio (per batch, per layer, held-out) and the default gamma
- ``readout``        the step's metrics read a step late; stop on a NaN/inf loss
- ``memory``         peak memory (CUDA allocator peaks, or the process's peak RSS)
- ``checkpointing``  atomic training-state checkpoints for ``--resume``
- ``metrics``        JSONL / TensorBoard metrics and the loss-curve PNG
- ``loop``           ``train(cfg) -> summary``: steps, evaluations, checkpoints
- ``report``         the run header, progress bar or log lines, summary and footer
- ``commands``       the ``train`` and ``info`` CLI commands
- ``fp8_study``      FP8 vs BF16 accuracy study (two runs, compared)

Nothing is imported here, so that ``coscale`` commands that do not train do not pay for torch.
"""

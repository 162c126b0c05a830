"""Training: the loop behind ``coscale train`` and the pieces it is made of.

- ``data``           byte tokenizer, embedded corpus, text / ``.bin`` token files, split, unigram entropy,
                     resumable random-window batches
- ``optim``          AdamW with FP32 master weights and FP32 or BF16 moments
- ``schedule``       linear warm-up + cosine learning rate
- ``checkpointing``  atomic training-state checkpoints for ``--resume``
- ``metrics``        JSONL / TensorBoard metrics and the loss-curve PNG
- ``loop``           ``TrainConfig`` and ``train(cfg) -> summary``
- ``commands``       the ``train`` and ``info`` CLI commands

Nothing is imported here, so that ``coscale`` commands that do not train do not pay for torch.
"""

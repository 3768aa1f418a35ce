"""The shared training loop: one explicit Accelerate loop with checkpoints and resume.

``vlpipe.train.loop.fit`` trains any model given a loss function; ``optim`` builds the
optimizer (AdamW or LXMERT's BertAdam) and the warmup + linear-decay schedule;
``checkpoint`` writes and finds atomic, checksummed checkpoints; ``sampler`` gives the
seeded, shardable, fast-forwardable data order.
"""

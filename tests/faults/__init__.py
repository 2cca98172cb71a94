"""Failure behaviour as a tested feature (issue 7): each test injects one fault and asserts
the outcome — the error the training step sees, or the recovery — and that nothing is
left behind (threads, actors, object references, object-store bytes), under a timeout.

    test_pipeline_faults.py  collate_fn / transport raise; break, close, GC, KeyboardInterrupt
    test_ray_faults.py       map_batches task fails transiently; a preprocessing actor dies
    test_node_loss.py        3-node cluster (subprocess): a node is removed mid-epoch
    test_ddp_faults.py       2 ranks (subprocesses, gloo): one rank raises
"""

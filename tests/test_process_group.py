"""`orchestrator.process_group`: DeepSpeed's group without its shared-memory all-reduce op, which on a CPU machine
costs a probe of every op builder in each process and a C++ build on a clean machine, for an inference collective
training never calls; the group's collectives still work."""

import torch
import torch.distributed as dist


def test_the_group_has_no_shared_memory_op_and_its_collectives_work(one_rank_group):
    import deepspeed.comm as ds_comm
    from deepspeed.comm import comm

    assert comm.cdb.shm_comm_op is None
    tensor = torch.tensor([1.0, 2.0])
    ds_comm.all_reduce(tensor)
    assert tensor.tolist() == [1.0, 2.0] and dist.get_world_size() == 1

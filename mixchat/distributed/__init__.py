"""One model across several processes or machines, on torch.distributed, launched by torchrun.

group: the process group (gloo), its messages and how a lost rank is named. pipeline: the split plans and
rank 0's side of each chunk and of the KV caches. serving: the loop the other ranks serve it with.
experts: the expert split's MoE layer.
"""

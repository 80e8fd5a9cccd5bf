"""How a run gets its processes.

- `pipeline.launchers.distributed`: `+deployment=single_node|multi_node` re-runs the same command under
  torchrun or the DeepSpeed launcher (hostfile) when it is not already inside one.
- `pipeline.launchers.slurm`: inside a SLURM job step, torch.distributed comes from SLURM's variables;
  a pre-empted run (exit code 75 after its checkpoint) requeues its job.
- `pipeline.launchers.hostfile`: DeepSpeed-style hostfiles (`worker-1 slots=8`).
- `pipeline.launchers.process_env`: what the environment says about how this process was started
  (SLURM job step, node list, task counts, rendezvous port; a launcher's RANK); the two above read it.
- `pipeline.launchers.node_launch`: the launch file and stop file of a run on several nodes.

Launchers import only the leaves of pipeline/ (config types, errors, dist, files); pipeline/cli.py
and pipeline/__main__.py are what import launchers.
- `conf/hydra/launcher/slurm.yaml`: the Hydra launcher plugin (hydra-submitit-launcher) config.
"""

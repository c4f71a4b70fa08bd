# Sourced by the sbatch templates: `launch COMMAND ...` runs the training launcher (torchrun, or srun torchrun) in the
# background and stays until it has exited, passing the job's signals on to it. The trainer stops on SIGTERM: every
# rank finishes its step, the ranks save a checkpoint, rank 0 prints `stopped by SIGTERM at step N; saved iter_N;
# resume with --load DIR`, and they exit (README, "Stopping and divergence").
#
# - SIGUSR1: the templates ask Slurm for it ten minutes before the time limit, sent to this script only
#   (`#SBATCH --signal=B:USR1@600`). The launcher gets SIGTERM (torchrun passes it to its ranks, srun to every node's
#   torchrun); once it has exited, the job is requeued and resumes from that checkpoint (RESUME in the templates).
# - SIGTERM (preemption, `scancel`, the time limit itself): passed on the same way, no requeue here: Slurm requeues a
#   preempted job itself (`#SBATCH --requeue`), and a cancelled job stays cancelled.
# The script must outlive the ranks: the job ends when it exits, and Slurm then kills what is left, mid-save.
# torchrun waits TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds for its ranks after passing a signal before it kills them
# (torch 2.14 reads the variable; older versions wait 30 s): long enough for a step and a save, inside the 600 s.
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-540}

launch() {
  STOP_SIGNAL=
  trap 'STOP_SIGNAL=USR1; echo "time limit in 10 minutes: the ranks save and stop, then the job is requeued"; kill -TERM "$LAUNCHER" 2>/dev/null || true' USR1
  trap 'STOP_SIGNAL=${STOP_SIGNAL:-TERM}; kill -TERM "$LAUNCHER" 2>/dev/null || true' TERM
  "$@" &
  LAUNCHER=$!
  local rc
  while true; do
    wait "$LAUNCHER" && rc=0 || rc=$?
    kill -0 "$LAUNCHER" 2>/dev/null || break  # `wait` also returns when a trapped signal arrives
  done
  trap - USR1 TERM
  if [[ $STOP_SIGNAL == USR1 ]]; then
    scontrol requeue "$SLURM_JOB_ID"
    return 0
  fi
  return "$rc"
}

# Shared by perf/flamegraph and perf/syscalls (sourced, not run). The caller defines
# die(), sets $work to its scratch directory and appends every process it starts to pids.

pids=()

# Stop what was started (in reverse order), remove $work, keep the exit status.
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
    kill "${pids[i]}" 2>/dev/null || true
  done
  for p in "${pids[@]}"; do
    for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$p" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
  done
  rm -rf "$work"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

wait_ping() { # name pid port logfile
  local name=$1 pid=$2 port=$3 log=$4
  for _ in $(seq 150); do
    kill -0 "$pid" 2>/dev/null || { tail -n 30 "$log" >&2; die "$name exited before answering PING"; }
    [[ "$(redis-cli -h 127.0.0.1 -p "$port" ping 2>/dev/null)" == PONG ]] && return 0
    sleep 0.1
  done
  tail -n 30 "$log" >&2
  die "$name did not answer PING on 127.0.0.1:$port within 15s"
}

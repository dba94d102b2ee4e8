# Sourced by run_train_*.sh. launch_trainer ARGS... runs `accelerate launch ARGS...` so that a stop signal
# always ends in a saved checkpoint, and returns when the trainers have saved it, with 130 (SIGINT), 143
# (SIGTERM) or 129 (SIGHUP: the terminal closed). accelerate runs in a process group of its own, so a stop
# reaches it only through this script: Ctrl-C in a terminal, `kill PID`, `timeout`, `docker stop` (when the
# script is the container's first process) all land here, and go to the trainers alone. accelerate's
# one-process launcher would not pass a signal on (its trainer ran on alone), and torch's multi-GPU launcher
# kills its trainers 30 s after it passes one on, which can cut a large checkpoint short.

# The processes whose parent is $1: /proc on Linux (slim container images lack pgrep), pgrep elsewhere.
_children_of() {
  local parent=$1 stat line fields
  if [ ! -r /proc/self/stat ]; then
    pgrep -P "$parent" || true
    return 0
  fi
  for stat in /proc/[0-9]*/stat; do
    { read -r line < "$stat"; } 2>/dev/null || continue  # gone meanwhile
    read -r -a fields <<< "${line##*) }"                  # after "PID (COMMAND) ": STATE PPID ...
    if [ "${fields[1]}" = "$parent" ]; then
      stat=${stat#/proc/}
      echo "${stat%/stat}"
    fi
  done
  return 0
}

_forward_stop() {  # SIGNAL (sent to the trainers) NUMBER (of the one received)
  _stopped=$((128 + $2)) _interrupted=1
  local pid
  for pid in $(_children_of "$_launcher"); do
    kill -s "$1" "$pid" 2>/dev/null || true
  done
}

launch_trainer() {
  # accelerate inherits these ignored and waits for its trainers, which set their own handlers
  trap '' INT TERM
  # --quiet: the trainer prints its own errors; accelerate would add a traceback of its own to each.
  # set -m: its own process group, out of reach of the terminal's Ctrl-C and of signals to this script's group
  set -m
  accelerate launch --quiet "$@" &
  _launcher=$! _stopped=0
  set +m
  trap '_forward_stop INT 2' INT
  trap '_forward_stop TERM 15' TERM
  trap '_forward_stop TERM 1' HUP
  local status
  while :; do  # a trapped signal ends `wait` early: then wait again
    _interrupted=0
    wait "$_launcher" && status=0 || status=$?
    [ "$_interrupted" = 1 ] || break
  done
  if [ "$status" -ne 0 ] && [ "$_stopped" -ne 0 ]; then
    status=$_stopped  # accelerate reports a stopped trainer as 1
  fi
  return "$status"
}

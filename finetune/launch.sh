# Sourced by run_train_*.sh. launch_trainer ARGS... runs `accelerate launch ARGS...` so that a stop signal
# always ends in a saved checkpoint, and returns when the trainers have saved it, with 130 (SIGINT) or 143
# (SIGTERM). Ctrl-C in a terminal reaches every process of the group; a signal sent to this script alone
# (`kill PID`, `docker stop` when it is the container's first process, Kubernetes) is passed on to the
# trainers here, as accelerate's one-process launcher would not pass it on: its trainer would run on alone.

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

_forward_stop() {  # SIGNAL NUMBER
  _stopped=$((128 + $2)) _interrupted=1
  local pid
  for pid in $(_children_of "$_launcher"); do
    kill -s "$1" "$pid" 2>/dev/null || true
  done
}

launch_trainer() {
  # accelerate inherits these ignored and waits for its trainers, which set their own handlers
  trap '' INT TERM
  # --quiet: the trainer prints its own errors; accelerate would add a traceback of its own to each
  accelerate launch --quiet "$@" &
  _launcher=$! _stopped=0
  trap '_forward_stop INT 2' INT
  trap '_forward_stop TERM 15' TERM
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

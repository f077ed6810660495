# CPU readers for the bench scripts (sourced): from /proc, the robust figure
# on a shared machine.

# User + system CPU ticks of the given processes (one that has gone counts 0).
# The fields after the command's closing parenthesis: a command may hold spaces.
ticks() {
  local t=0 p stat f
  for p in "$@"; do
    stat=$(cat "/proc/$p/stat" 2>/dev/null) || continue
    read -r -a f <<<"${stat##*) }"
    t=$((t + f[11] + f[12]))
  done
  echo "$t"
}

# ms of CPU per 1,000 operations: ticks, operations[, decimals (default 0)].
per_k() {
  python3 -c "import os, sys; t, n = map(float, sys.argv[1:3]); print(f'{t / os.sysconf(\"SC_CLK_TCK\") * 1e6 / n:.{sys.argv[3]}f}')" \
    "$1" "$2" "${3:-0}"
}

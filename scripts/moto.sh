#!/usr/bin/env bash
# Sourced by the other scripts: start_moto starts one moto server on a free loopback
# port, exports MOTO_ENDPOINT and AWS_ENDPOINT_URL, and stops it when the shell exits.

start_moto() {
  local port log
  port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()')
  log=${MOTO_LOG:-$(mktemp -t moto.XXXXXX.log)}
  echo "==> Starting moto server on 127.0.0.1:$port (log: $log)"
  moto_server -H 127.0.0.1 -p "$port" >"$log" 2>&1 &
  MOTO_PID=$!
  # shellcheck disable=SC2064 # expand now: the pid is known now
  trap "kill $MOTO_PID 2>/dev/null || true" EXIT
  export MOTO_ENDPOINT="http://127.0.0.1:$port"
  local tries=0
  until python3 -c "import urllib.request, sys; urllib.request.urlopen(sys.argv[1] + '/moto-api/', timeout=1)" "$MOTO_ENDPOINT" 2>/dev/null; do
    tries=$((tries + 1))
    if [ "$tries" -ge 60 ] || ! kill -0 "$MOTO_PID" 2>/dev/null; then
      echo "error: moto server did not start; its log:" >&2
      cat "$log" >&2
      return 1
    fi
    sleep 0.5
  done
  echo "==> moto is up at $MOTO_ENDPOINT"
}

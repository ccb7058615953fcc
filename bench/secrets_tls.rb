# frozen_string_literal: true

# The cost of TLS interception (secrets), end to end: a Debian guest (python3's ssl)
# downloads over HTTPS from a server inside the test internet (spec/support/netns.rb:
# a network namespace, documentation addresses), once through interception (inet.test
# carries a secret: the supervisor terminates TLS, substitutes, re-encrypts) and once
# passed through untouched (alias.inet.test, same server and address, is in
# `tls.bypass`). Every request is a new connection (handshakes included) and carries
# the secret's placeholder in a header. Issue 11's targets: 1 KiB GET p50 latency
# ≤ 1.5× the bypass; 16 MiB GET throughput ≥ 0.7× the bypass.
#
#   sudo ruby -Ilib bench/secrets_tls.rb [--small-runs 21] [--big-runs 3] [--big-mib 16]
#
# Needs root (the test internet). Times are taken in the guest (time.monotonic around
# connect → last byte). Intercepted and bypassed batches alternate, so host load drifts
# hit both. Never fails: this is a report (PASS/MISS per target).

require "optparse"
require "tmpdir"
require "fileutils"
require "timeout"
require "etc"
require "microsandbox"
require_relative "scratch_home"

BenchScratchHome.setup!
require_relative "../spec/support/netns"
require_relative "../spec/support/registry"
require_relative "../spec/support/debian_image"
require_relative "../spec/support/test_pki"

opts = { small_runs: 21, big_runs: 3, big_mib: 16 }
OptionParser.new do |o|
  o.on("--small-runs N", Integer) { |v| opts[:small_runs] = v }
  o.on("--big-runs N", Integer) { |v| opts[:big_runs] = v }
  o.on("--big-mib N", Integer) { |v| opts[:big_mib] = v }
end.parse!

CLIENT = <<~'PY'
  import os, socket, ssl, sys, time
  host, size, runs, verify = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
  ctx = ssl.create_default_context() if verify == "default" else ssl.create_default_context(cafile=verify)
  req = ("GET /size/%d HTTP/1.1\r\nHost: %s\r\nX-Key: %s\r\nConnection: close\r\n\r\n"
         % (size, host, os.environ["API_KEY"])).encode()
  for _ in range(runs):
      t = time.monotonic()
      s = ctx.wrap_socket(socket.create_connection((host, 443), timeout=300), server_hostname=host)
      s.sendall(req)
      data = b""
      while b"\r\n\r\n" not in data:
          data += s.recv(65536)
      got = len(data.partition(b"\r\n\r\n")[2])
      while got < size:
          chunk = s.recv(1 << 20)
          if not chunk:
              raise SystemExit("short body: %d of %d" % (got, size))
          got += len(chunk)
      s.close()
      print("%.6f" % (time.monotonic() - t), flush=True)
PY

def median(xs) = xs.sort[xs.size / 2]

net = MicrosandboxSpec::NetNS.start!
ref = MicrosandboxSpec::DebianImage.push(MicrosandboxSpec::Registry.instance)
dir = Dir.mktmpdir("msb-bench-tls")
ca, cert, key = MicrosandboxSpec::TestPki.write(dir, "bench", %w[inet.test alias.inet.test])
_, other_cert, other_key = MicrosandboxSpec::TestPki.write(dir, "unused", %w[inet.test])
server = File.expand_path("../spec/support/tls_record_server.rb", __dir__)
out_r, out_w = IO.pipe
pid = Process.spawn("ip", "netns", "exec", net.name, RbConfig.ruby, server, cert, key, other_cert, other_key,
                    out: out_w, err: File::NULL)
out_w.close
raise "the TLS server did not start" unless Timeout.timeout(20) { out_r.gets } == "ready\n"

puts "secrets TLS interception: python3 ssl in the guest, new connection per GET, " \
     "host #{Etc.nprocessors} cores"
begin
  Microsandbox::Sandbox.create(
    "bench-secrets-tls", image: ref, registry_insecure: true, memory: 1024,
                         dns: { nameservers: [net::DNS], query_timeout_ms: 2000 },
                         secrets: [{ env: "API_KEY", value: "sk-bench-#{rand(1 << 64).to_s(16)}", host: "inet.test" }],
                         tls: { upstream_ca_cert: ca, bypass: ["alias.inet.test"] }
  ) do |sb|
    sb.fs.write("/tmp/server-ca.pem", File.read(ca))
    run = lambda do |host, size, runs|
      verify = host == "inet.test" ? "default" : "/tmp/server-ca.pem"
      r = sb.exec("python3", ["-c", CLIENT, host, size.to_s, runs.to_s, verify], timeout: 3600)
      raise "guest client failed: #{r.stderr}" unless r.success?

      r.stdout.split.map(&:to_f)
    end
    # Warm-up: DNS, python start-up, and the first leaf for inet.test (generated once,
    # then cached — the first intercepted connection is shown separately).
    first = run.call("inet.test", 1024, 1).first
    run.call("alias.inet.test", 1024, 1)
    small = { intercepted: [], bypass: [] }
    big = { intercepted: [], bypass: [] }
    per_batch = [opts[:small_runs] / 3, 1].max
    3.times do
      small[:intercepted].concat(run.call("inet.test", 1024, per_batch))
      small[:bypass].concat(run.call("alias.inet.test", 1024, per_batch))
    end
    opts[:big_runs].times do
      big[:intercepted].concat(run.call("inet.test", opts[:big_mib] << 20, 1))
      big[:bypass].concat(run.call("alias.inet.test", opts[:big_mib] << 20, 1))
    end
    p50 = small.transform_values { |v| median(v) * 1000 }
    mibs = big.transform_values { |v| opts[:big_mib] / median(v) }
    lat_ratio = p50[:intercepted] / p50[:bypass]
    tput_ratio = mibs[:intercepted] / mibs[:bypass]
    printf("first intercepted 1 KiB GET (leaf generated): %.1f ms\n", first * 1000)
    printf("1 KiB GET p50 (n=%d each): intercepted %.1f ms, bypass %.1f ms, ratio %.2f (target <= 1.5) %s\n",
           small[:bypass].size, p50[:intercepted], p50[:bypass], lat_ratio, lat_ratio <= 1.5 ? "PASS" : "MISS")
    printf("%d MiB GET median (n=%d each): intercepted %.1f MiB/s, bypass %.1f MiB/s, ratio %.2f (target >= 0.7) %s\n",
           opts[:big_mib], big[:bypass].size, mibs[:intercepted], mibs[:bypass], tput_ratio, tput_ratio >= 0.7 ? "PASS" : "MISS")
  end
ensure
  Process.kill("TERM", pid)
  Process.wait(pid)
  FileUtils.rm_rf(dir)
  Microsandbox::Sandbox.remove("bench-secrets-tls") if Microsandbox::Sandbox.list.any? { |i| i.name == "bench-secrets-tls" }
end

# frozen_string_literal: true

require "base64"
require "json"
require "open3"
require "securerandom"
require "tmpdir"
require "timeout"
require_relative "../support/netns"
require_relative "../support/registry"
require_relative "../support/debian_image"
require_relative "../support/test_pki"

# Secrets on real traffic: a Debian guest (python3) talks HTTPS to a server inside the
# test internet (spec/support/tls_record_server.rb, certificates from a CA made here),
# through the supervisor's TLS interception. The server records what it receives.
RSpec.describe "secrets substituted on intercepted TLS" do
  before(:all) do
    # Fresh values per run, so a hit can only come from this run.
    @value = "sk-live-#{SecureRandom.hex(16)}"
    @second = "sk-second-#{SecureRandom.hex(8)}"
    @third = "sk-third-#{SecureRandom.hex(8)}"
    @net = MicrosandboxSpec::NetNS.start!
    @ref = MicrosandboxSpec::DebianImage.push(MicrosandboxSpec::Registry.instance)
    @dir = Dir.mktmpdir("msb-tls-spec")
    @ca, cert, key = MicrosandboxSpec::TestPki.write(@dir, "good", %w[inet.test other.inet.test alias.inet.test])
    # Port 8443 serves a certificate from a CA the sandbox does not trust.
    _, bad_cert, bad_key = MicrosandboxSpec::TestPki.write(@dir, "stranger", %w[inet.test])
    script = File.expand_path("../support/tls_record_server.rb", __dir__)
    @server_out, w = IO.pipe
    @server_pid = Process.spawn("ip", "netns", "exec", @net.name, RbConfig.ruby, script, cert, key, bad_cert, bad_key,
                                out: w, err: File::NULL)
    w.close
    line = Timeout.timeout(20) { @server_out.gets }
    raise "the TLS record server did not start" unless line == "ready\n"

    @name = unique_name("sectls")
    @sb = Microsandbox::Sandbox.create(
      @name, image: @ref, registry_insecure: true,
             dns: { nameservers: [@net::DNS], query_timeout_ms: 2000 },
             secrets: [{ env: "API_KEY", value: @value, host: "inet.test" },
                       { env: "SECOND_KEY", value: @second, host: "other.inet.test" },
                       { env: "FORM_KEY", value: @third, host: "inet.test", inject_query: true, inject_body: true }],
             tls: { upstream_ca_cert: @ca, intercepted_ports: [443, 8443], bypass: ["alias.inet.test"] }
    )
    @sb.fs.write("/tmp/test-ca.pem", File.read(@ca))
  end

  after(:all) do
    @sb&.kill
    Microsandbox::Sandbox.remove(@name) if @name && Microsandbox::Sandbox.list.any? { |i| i.name == @name }
    if @server_pid
      Process.kill("TERM", @server_pid)
      Timeout.timeout(5) { Process.wait(@server_pid) }
    end
    FileUtils.rm_rf(@dir) if @dir
  end

  # Requests the server recorded since the last call (waits up to `timeout` for `count`).
  def recorded(count, timeout: 30)
    out = []
    deadline = Process.clock_gettime(Process::CLOCK_MONOTONIC) + timeout
    while out.size < count
      left = deadline - Process.clock_gettime(Process::CLOCK_MONOTONIC)
      break if left <= 0
      break unless @server_out.wait_readable(left)

      line = @server_out.gets or break
      h = JSON.parse(line)
      out << h.merge("request" => Base64.strict_decode64(h["request"]))
    end
    out
  end

  # Runs one HTTPS request from the guest with python's ssl module (the image's python is
  # python3-minimal: no http.client, no json); prints "<status> <body>" or
  # "ERR <exception class>: <message>". Header values go through os.path.expandvars, so
  # "$API_KEY" is what a program reading the environment would send.
  def guest_request(host, headers, port: 443, verify: :default, path: "/v1/x", body: nil, chunked: false)
    script = <<~'PY'
      import os, socket, ssl, sys
      host, port, path, verify, body, chunked = sys.argv[1], int(sys.argv[2]), os.path.expandvars(sys.argv[3]), sys.argv[4], sys.argv[5], sys.argv[6] == "1"
      if verify == "none":
          ctx = ssl._create_unverified_context()
      elif verify == "default":
          ctx = ssl.create_default_context()
      else:
          ctx = ssl.create_default_context(cafile=verify)
      try:
          s = ctx.wrap_socket(socket.create_connection((host, port), timeout=60), server_hostname=host)
          method = "POST" if body else "GET"
          req = "%s %s HTTP/1.1\r\nHost: %s\r\n" % (method, path, host if port == 443 else "%s:%d" % (host, port))
          for h in sys.argv[7:]:
              req += os.path.expandvars(h) + "\r\n"
          body = os.path.expandvars(body).encode()
          if body and chunked:
              # In two chunks, split inside the placeholder.
              half = len(body) // 2
              req += "Transfer-Encoding: chunked\r\n"
              payload = b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n" % (half, body[:half], len(body) - half, body[half:])
          elif body:
              req += "Content-Length: %d\r\n" % len(body)
              payload = body
          else:
              payload = b""
          s.sendall((req + "Connection: close\r\n\r\n").encode() + payload)
          data = b""
          while b"\r\n\r\n" not in data:
              chunk = s.recv(65536)
              if not chunk:
                  raise EOFError("no response head")
              data += chunk
          head, _, body = data.partition(b"\r\n\r\n")
          length = [int(l.split(b":")[1]) for l in head.split(b"\r\n") if l.lower().startswith(b"content-length:")][0]
          while len(body) < length:
              chunk = s.recv(65536)
              if not chunk:
                  raise EOFError("short body")
              body += chunk
          print(head.split(b" ")[1].decode(), body.decode().strip())
      except Exception as e:
          print("ERR", type(e).__name__ + ":", e)
    PY
    args = [script, host, port.to_s, path, verify.to_s, body.to_s, chunked ? "1" : "0"] + headers.map { |k, v| "#{k}: #{v}" }
    out = @sb.exec("python3", ["-c", *args], timeout: 120)
    expect(out.stderr).to eq("")
    out.stdout
  end

  # The data of a chunked body (chunk sizes and framing removed).
  def dechunk(body)
    out = +""
    rest = body
    loop do
      size, rest = rest.split("\r\n", 2)
      n = size.to_i(16)
      break if n.zero? || rest.nil?

      out << rest[0, n]
      rest = rest[(n + 2)..] || ""
    end
    out
  end

  def system_log
    @sb.logs(sources: ["system"]).map(&:text).join("\n")
  end

  it "installs the sandbox's CA in the guest and points TLS clients at it" do
    out = @sb.shell("echo $SSL_CERT_FILE $REQUESTS_CA_BUNDLE $CURL_CA_BUNDLE $NODE_EXTRA_CA_CERTS; " \
                    "grep -c 'BEGIN CERTIFICATE' /.msb/tls/extra.pem; grep -c 'BEGIN microsandbox' /etc/ssl/certs/ca-certificates.crt")
    expect(out.stdout).to eq("/.msb/tls/bundle.pem /.msb/tls/bundle.pem /.msb/tls/bundle.pem /.msb/tls/extra.pem\n1\n1\n")
    # The guest's default trust (python's ssl defaults read SSL_CERT_FILE) accepts the leaf.
    expect(guest_request("inet.test", {})).to start_with("200 ok")
    expect(recorded(1).size).to eq(1)
  end

  it "puts the real value into a header toward the allowed host, and only there" do
    expect(@sb.shell("echo $API_KEY").stdout).to eq("$MSB_API_KEY\n")
    expect(guest_request("inet.test", { "Authorization" => "Bearer $API_KEY" })).to match(/\A200 ok \d+\n\z/)
    req = recorded(1).first
    expect(req["addr"]).to eq("203.0.113.10")
    expect(req["request"]).to include("Authorization: Bearer #{@value}\r\n", "Host: inet.test\r\n")
    expect(req["request"]).not_to include("$MSB_API_KEY")
  end

  it "substitutes inside Basic credentials" do
    creds = Base64.strict_encode64("user:$MSB_API_KEY")
    expect(guest_request("inet.test", { "Authorization" => "Basic #{creds}" })).to start_with("200 ok")
    expect(recorded(1).first["request"]).to include("Authorization: Basic #{Base64.strict_encode64("user:#{@value}")}\r\n")
  end

  it "substitutes in the query and in fixed-length and chunked bodies when the secret enables them" do
    expect(guest_request("inet.test", {}, path: "/q?key=$FORM_KEY&k2=%24MSB_FORM_KEY")).to start_with("200 ok")
    expect(recorded(1).first["request"]).to start_with("GET /q?key=#{@third}&k2=#{@third} HTTP/1.1\r\n")
    expect(guest_request("inet.test", {}, body: '{"token":"$FORM_KEY"}')).to start_with("200 ok")
    req = recorded(1).first["request"]
    expect(req).to include("Content-Length: #{%({"token":"#{@third}"}).bytesize}\r\n")
    expect(req).to end_with(%(\r\n\r\n{"token":"#{@third}"}))
    expect(guest_request("inet.test", {}, body: "token=$FORM_KEY", chunked: true)).to start_with("200 ok")
    req = recorded(1).first["request"]
    expect(req).to include("Transfer-Encoding: chunked\r\n")
    expect(dechunk(req.split("\r\n\r\n", 2).last)).to eq("token=#{@third}")
    # API_KEY enables neither: its placeholder in the query passes unchanged (it is not the value).
    expect(guest_request("inet.test", {}, path: "/q?key=$API_KEY")).to start_with("200 ok")
    expect(recorded(1).first["request"]).to start_with("GET /q?key=$MSB_API_KEY HTTP/1.1\r\n")
  end

  it "cuts a request that carries a placeholder to a host its secret does not name, and logs it by env name" do
    out = guest_request("other.inet.test", { "Authorization" => "Bearer $API_KEY" })
    expect(out).to start_with("ERR")
    expect(recorded(1, timeout: 5)).to eq([])
    expect(system_log).to include("secret API_KEY placeholder headed to other.inet.test (203.0.113.11:443) in the header: connection cut")
    # That host's own secret goes there; a request without placeholders passes unchanged.
    expect(guest_request("other.inet.test", { "X-Key" => "$SECOND_KEY", "X-Plain" => "hello" })).to start_with("200 ok")
    req = recorded(1).first["request"]
    expect(req).to include("X-Key: #{@second}\r\n", "X-Plain: hello\r\n")
    expect(req).not_to include(@value)
  end

  it "refuses an upstream whose certificate it cannot verify, before the guest sees a certificate" do
    out = guest_request("inet.test", { "Authorization" => "Bearer $API_KEY" }, port: 8443)
    expect(out).to start_with("ERR")
    expect(recorded(1, timeout: 5)).to eq([])
    expect(system_log).to match(%r{TLS to inet\.test \(203\.0\.113\.10:8443\) failed: .*(UnknownIssuer|certificate)})
  end

  it "passes a bypassed name through untouched (the guest sees the server's own certificate)" do
    expect(guest_request("alias.inet.test", { "X-Key" => "$API_KEY" }, verify: "/tmp/test-ca.pem")).to start_with("200 ok")
    req = recorded(1).first["request"]
    expect(req).to include("X-Key: $MSB_API_KEY\r\n")
    expect(req).not_to include(@value)
    # An intercepted name does not verify against the server's CA: the guest got a leaf.
    expect(guest_request("inet.test", {}, verify: "/tmp/test-ca.pem")).to match(/ERR SSLCertVerificationError/)
  end

  it "drops QUIC (UDP 443) toward intercepted hosts" do
    out = @sb.exec("python3", ["-c", <<~PY], timeout: 60)
      import socket
      s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
      s.sendto(b"quic?", ("inet.test", 443))
      print("sent")
    PY
    expect(out.stdout).to eq("sent\n")
    expect(wait_until(timeout: 10) { system_log.include?("dropped UDP to 203.0.113.10:443") }).to be(true)
  end

  it "keeps the values out of the guest, the logs, inspect and the sandbox's files" do
    [@value, @second, @third].each do |v|
      out = @sb.shell("cat /proc/[0-9]*/environ | grep -c -F '#{v}'; grep -rlsF '#{v}' /etc /tmp /root /srv /run; dmesg | grep -cF '#{v}'")
      expect(out.stdout).to eq("0\n0\n")
      expect(@sb.logs.map(&:text).join).not_to include(v)
      expect(@sb.inspect).not_to include(v)
      hits, status = Open3.capture2("grep", "-rlaF", "--", v, sandbox_dir(@name))
      expect(status.exitstatus).to eq(1), hits
    end
  end
end

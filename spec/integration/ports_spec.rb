# frozen_string_literal: true

require "digest"
require "socket"
require_relative "../support/registry"
require_relative "../support/debian_image"

# Published ports (`ports:`, `ports_udp:`), ingress rules, `max_connections:`,
# `ipv4_pool:` and the NIC's byte counters, against real VMs. All traffic is host loopback
# (127.0.0.0/8 and ::1) into the sandbox's published ports.
RSpec.describe "Published ports" do
  # A host port nothing listens on (bound and released: another process could take it in
  # between, which would fail the spec loudly, never pass it wrongly).
  def free_port(proto = :tcp, host: "127.0.0.1")
    s = proto == :tcp ? TCPServer.new(host, 0) : UDPSocket.new(host.include?(":") ? Socket::AF_INET6 : Socket::AF_INET).tap { |u| u.bind(host, 0) }
    s.addr[1]
  ensure
    s&.close
  end

  def wait_listening(sb, port, proto = "t")
    ok = wait_until(timeout: 60, interval: 0.3) { sb.shell("netstat -ln#{proto}").stdout.include?(":#{port} ") }
    raise "the guest server on port #{port} did not start" unless ok
  end

  # Sends `data` through the guest echo on `port` and returns what came back.
  def echo(port, data, host: "127.0.0.1", local: nil)
    s = local ? Socket.tcp(host, port, local, 0) : TCPSocket.new(host, port)
    s.write(data)
    s.close_write
    Timeout.timeout(60) { s.read }
  ensure
    s&.close
  end

  def system_log(sb) = sb.logs(sources: ["system"]).map(&:text).join("\n")

  # The host client was reset: a read sees ECONNRESET, a write after the RST arrived EPIPE.
  def reset_error
    satisfy("ECONNRESET or EPIPE") { |e| [Errno::ECONNRESET, Errno::EPIPE].include?(e.class) }
  end

  # Kills a guest server that may have ended with its sandbox already.
  def stop_server(handle)
    handle&.kill
  rescue Microsandbox::Error
    nil
  end

  describe "TCP, default policy" do
    before(:all) do
      @p = Array.new(5) { free_port }
      @p6 = free_port(host: "::1")
      @sb = Microsandbox::Sandbox.create(unique_name("ports"), image: rootfs,
                                                               ports: { @p[0] => 8000, "127.0.0.2:#{@p[1]}" => 8000,
                                                                        @p[2].to_s => 8001, @p[3] => 8002, @p[4] => 8003,
                                                                        "[::1]:#{@p6}" => 8000 })
      # A persistent echo server: one `cat` per connection.
      @echo = @sb.shell_stream("nc -ll -p 8000 -e cat")
      wait_listening(@sb, 8000)
    end
    after(:all) do
      stop_server(@echo)
      @sb&.kill
    end

    it "answers on 127.0.0.1 by default, and on the address an \"address:port\" key names" do
      expect(echo(@p[0], "hello\n")).to eq("hello\n")
      expect(echo(@p[1], "there\n", host: "127.0.0.2")).to eq("there\n")
      expect { TCPSocket.new("127.0.0.2", @p[0]) }.to raise_error(Errno::ECONNREFUSED)
      expect { TCPSocket.new("127.0.0.1", @p[1]) }.to raise_error(Errno::ECONNREFUSED)
    end

    it "answers on IPv6 loopback for a \"[::1]:port\" key, and only there (an IPv6-only listener)" do
      expect(echo(@p6, "over six\n", host: "::1")).to eq("over six\n")
      expect { TCPSocket.new("127.0.0.1", @p6) }.to raise_error(Errno::ECONNREFUSED)
    end

    it "resets the host client at once when nothing listens on the guest port" do
      started = Process.clock_gettime(Process::CLOCK_MONOTONIC)
      s = TCPSocket.new("127.0.0.1", @p[2])
      expect { Timeout.timeout(30) { s.write("x") && s.read } }.to raise_error(reset_error)
      expect(Process.clock_gettime(Process::CLOCK_MONOTONIC) - started).to be < 10
    ensure
      s&.close
    end

    it "moves 16 MiB each way byte-exact, and Metrics counts the bytes" do
      data = Random.new(7).bytes(16 << 20)
      before = @sb.metrics
      up = @sb.shell_stream("nc -l -p 8002 | sha256sum")
      wait_listening(@sb, 8002)
      s = TCPSocket.new("127.0.0.1", @p[3])
      s.write(data)
      s.close_write
      Timeout.timeout(60) { s.read }
      s.close
      expect(up.collect.stdout).to eq("#{Digest::SHA256.hexdigest(data)}  -\n")

      blob = @sb.shell("head -c 16777216 /dev/urandom > /tmp/blob && sha256sum < /tmp/blob", timeout: 120).stdout
      down = @sb.shell_stream("nc -l -p 8003 < /tmp/blob")
      wait_listening(@sb, 8003)
      got = Timeout.timeout(300) { TCPSocket.open("127.0.0.1", @p[4]) { |c| c.read } }
      down.wait
      expect(got.bytesize).to eq(16 << 20)
      expect("#{Digest::SHA256.hexdigest(got)}  -\n").to eq(blob)

      after = @sb.metrics
      expect(after.net_rx_bytes - before.net_rx_bytes).to be >= (16 << 20)
      expect(after.net_tx_bytes - before.net_tx_bytes).to be >= (16 << 20)
    end

    it "closes every listener with the sandbox" do
      stop_server(@echo)
      @sb.stop
      [["127.0.0.1", @p[0]], ["127.0.0.2", @p[1]], ["127.0.0.1", @p[2]], ["::1", @p6]].each do |host, port|
        expect { TCPSocket.new(host, port) }.to raise_error(Errno::ECONNREFUSED)
      end
    end
  end

  describe "ingress rules and max_connections" do
    before(:all) do
      @port = free_port
      @port6 = free_port(host: "::1")
      policy = Microsandbox::NetworkPolicy.custom(
        default_egress: :deny, default_ingress: :allow,
        rules: [Microsandbox::Rule.deny(destination: "127.0.0.3", direction: :ingress),
                Microsandbox::Rule.deny(destination: "::1/128", direction: :ingress, port: 8000)]
      )
      @sb = Microsandbox::Sandbox.create(unique_name("ingress"), image: rootfs, network: policy,
                                                                 ports: { @port => 8000, "[::1]:#{@port6}" => 8000 }, max_connections: 2)
      @echo = @sb.shell_stream("nc -ll -p 8000 -e cat")
      wait_listening(@sb, 8000)
    end
    after(:all) do
      stop_server(@echo)
      @sb&.kill
    end

    it "resets a peer an ingress rule denies, logs why, and serves the others" do
      expect { echo(@port, "no\n", local: "127.0.0.3") }.to raise_error(reset_error)
      expect(echo(@port, "yes\n")).to eq("yes\n")
      # The log is written by the supervisor's log task: give it a moment under load.
      logged = wait_until(timeout: 30) { system_log(@sb).match?(/refused inbound TCP from 127\.0\.0\.3:\d+ to published port 127\.0\.0\.1:#{@port} \(guest port 8000\) \(rule 0/) }
      expect(logged).to be(true), system_log(@sb)
    end

    it "judges an IPv6 peer by the IPv6 rules: ::1 is reset by an ingress rule for ::1/128" do
      expect { echo(@port6, "no\n", host: "::1") }.to raise_error(reset_error)
      logged = wait_until(timeout: 30) do
        system_log(@sb).match?(/refused inbound TCP from \[::1\]:\d+ to published port \[::1\]:#{@port6} \(guest port 8000\) \(rule 1/)
      end
      expect(logged).to be(true), system_log(@sb)
    end

    it "refuses a connection beyond max_connections with a log entry, and serves again once one closes" do
      held = Array.new(2) do
        s = TCPSocket.new("127.0.0.1", @port)
        s.write("held\n")
        expect(Timeout.timeout(30) { s.gets }).to eq("held\n")
        s
      end
      expect { echo(@port, "third\n") }.to raise_error(reset_error)
      logged = wait_until(timeout: 30) { system_log(@sb).include?("to published port 127.0.0.1:#{@port} (guest port 8000): max_connections (2) reached") }
      expect(logged).to be(true), system_log(@sb)
      held.pop.close
      ok = wait_until(timeout: 30, interval: 0.5) do
        echo(@port, "again\n") == "again\n"
      rescue Errno::ECONNRESET, Errno::EPIPE
        false
      end
      expect(ok).to be(true)
    ensure
      held&.each(&:close)
    end
  end

  it "leaves the stack's refusals out of the logs with quiet_logs: true (the reference's \"no runtime logs\")" do
    port = free_port
    Microsandbox::Sandbox.create(unique_name("quiet"), image: rootfs, quiet_logs: true, ports: { port => 8000 },
                                                       network: { default_egress: :deny, default_ingress: :deny }) do |sb|
      expect { echo(port, "no\n") }.to raise_error(reset_error)
      expect(sb.shell("nc 172.16.0.1 #{port} </dev/null; echo rc=$?", timeout: 60).stdout).to include("rc=1")
      expect(system_log(sb)).not_to include("refused")
    end
  end

  describe "creating with a port in use, or a bad option" do
    it "raises PortInUseError before the VM starts and leaves nothing behind" do
      taken = TCPServer.new("127.0.0.1", 0)
      name = unique_name("inuse")
      expect do
        Microsandbox::Sandbox.create(name, image: rootfs, ports: { taken.addr[1] => 80 })
      end.to raise_error(Microsandbox::PortInUseError, /ports: cannot publish host 127\.0\.0\.1:#{taken.addr[1]} \(guest port 80\)/)
      expect(Microsandbox::PortInUseError.ancestors).to include(Microsandbox::InvalidConfigError)
      expect(Microsandbox::Sandbox.list.map(&:name)).not_to include(name)
      expect(processes_mentioning(sandbox_dir(name))).to be_empty
      expect(Dir.exist?(sandbox_dir(name))).to be(false)
    ensure
      taken&.close
    end

    # Starting a stopped or paused sandbox whose host port another program took meanwhile:
    # the start fails with the same typed error and changes nothing — a paused sandbox
    # keeps its saved state (its processes), a stopped one stays :stopped, not :crashed —
    # and the start succeeds once the port is free again.
    it "raises PortInUseError at Sandbox.start without losing a paused sandbox's processes or calling it crashed" do
      port = free_port
      name = unique_name("inuse-start")
      sb = Microsandbox::Sandbox.create(name, image: rootfs, ports: { port => 8000 })
      sb.shell("sleep 3600 >/dev/null 2>&1 & echo $! > /tmp/sleeper", timeout: 60)
      sleeper = sb.fs.read_text("/tmp/sleeper").strip
      sb.pause
      taken = TCPServer.new("127.0.0.1", port)
      expect { Microsandbox::Sandbox.start(name) }
        .to raise_error(Microsandbox::PortInUseError, /cannot publish host 127\.0\.0\.1:#{port} \(guest port 8000\)/)
      expect(Microsandbox::Sandbox.get(name).status).to eq(:paused)
      expect(processes_mentioning(sandbox_dir(name))).to be_empty
      taken.close
      Microsandbox::Sandbox.start(name) do |again|
        expect(again.info[:start]).to eq("resumed")
        expect(again.shell("kill -0 #{sleeper} && echo alive", timeout: 60).stdout).to eq("alive\n")
      end
      expect(Microsandbox::Sandbox.get(name).status).to eq(:stopped)
      taken = TCPServer.new("127.0.0.1", port)
      expect { Microsandbox::Sandbox.start(name) }.to raise_error(Microsandbox::PortInUseError)
      expect(Microsandbox::Sandbox.get(name).status).to eq(:stopped)
    ensure
      taken&.close
      Microsandbox::Sandbox.get(name).kill if name && Microsandbox::Sandbox.list.any? { |s| s.name == name && s.running? }
    end

    it "raises PortInUseError for a taken IPv6 port, and InvalidConfigError for an IPv6 address not the host's" do
      taken = TCPServer.new("::1", 0)
      name = unique_name("inuse6")
      expect do
        Microsandbox::Sandbox.create(name, image: rootfs, ports: { "[::1]:#{taken.addr[1]}" => 80 })
      end.to raise_error(Microsandbox::PortInUseError, /ports: cannot publish host \[::1\]:#{taken.addr[1]} \(guest port 80\)/)
      # 2001:db8:dead::/48: documentation space on no interface of this host (binding it
      # sends nothing anywhere).
      expect do
        Microsandbox::Sandbox.create(name, image: rootfs, ports_udp: { "[2001:db8:dead::1]:8080" => 53 })
      end.to raise_error(Microsandbox::InvalidConfigError,
                         /ports_udp: cannot publish host \[2001:db8:dead::1\]:8080 \(guest port 53\): .*not one of this host's; use 127\.0\.0\.1, \[::1\]/) { |e|
        expect(e).not_to be_a(Microsandbox::PortInUseError)
      }
      expect(Microsandbox::Sandbox.list.map(&:name)).not_to include(name)
      expect(processes_mentioning(sandbox_dir(name))).to be_empty
      expect(Dir.exist?(sandbox_dir(name))).to be(false)
    ensure
      taken&.close
    end

    it "rejects malformed ports, ipv4_pool, ipv6_pool and max_connections with typed errors naming the option" do
      cases = {
        { ports: { 0 => 80 } } => [Microsandbox::InvalidConfigError, /ports\[0\]: host_port must be between 1 and 65535/],
        { ports_udp: { 53 => 70_000 } } => [Microsandbox::InvalidConfigError, /ports_udp\[0\]: guest_port/],
        { ports: { "8080" => 80, 8080 => 81 } } => [Microsandbox::InvalidConfigError, /host port 8080 is published twice/],
        { ports: { "nope:80" => 80 } } => [Microsandbox::InvalidConfigError, /ports\[0\]: the host address/],
        { ports: { "80:90:100" => 80 } } => [ArgumentError, /ports: a host port is/],
        { ports: { "::1:8080" => 80 } } => [ArgumentError, /ports: an IPv6 host address goes in brackets/],
        { ports: { "[::ffff:127.0.0.1]:8080" => 80 } } => [Microsandbox::InvalidConfigError, /ports\[0\]: the host address must not be an IPv4-mapped/],
        { ports_udp: { "[ff02::1]:8080" => 80 } } => [Microsandbox::InvalidConfigError, /ports_udp\[0\]: the host address must not be a multicast/],
        { ports: [8080] } => [TypeError, /ports must be a Hash/],
        { network: "none", ports: { 8080 => 80 } } => [Microsandbox::InvalidConfigError, /no NIC/],
        { ipv4_pool: "10.0.0.0/31" } => [Microsandbox::InvalidConfigError, %r{ipv4_pool: the prefix must be /30 or shorter}],
        { ipv4_pool: "not-a-cidr" } => [Microsandbox::InvalidConfigError, /ipv4_pool: must be an IPv4 CIDR/],
        { ipv6_pool: "fd00::/127" } => [Microsandbox::InvalidConfigError, %r{ipv6_pool: the prefix must be /126 or shorter}],
        { ipv6_pool: "10.0.0.0/8" } => [Microsandbox::InvalidConfigError, /ipv6_pool: must be an IPv6 CIDR/],
        { ipv6_pool: "fe80::/64" } => [Microsandbox::InvalidConfigError, %r{ipv6_pool: must not be in ::/8, fe80::/10 or ff00::/8}],
        { max_connections: 0 } => [Microsandbox::InvalidConfigError, /max_connections must be between 1 and 4096/],
        { max_connections: "many" } => [ArgumentError, /max_connections must be an Integer/]
      }
      cases.each do |opts, (klass, message)|
        name = unique_name("badopt")
        expect { Microsandbox::Sandbox.create(name, image: rootfs, **opts) }.to raise_error(klass, message), opts.inspect
        expect(Microsandbox::Sandbox.list.map(&:name)).not_to include(name)
      end
    end
  end

  describe "UDP, concurrency and ipv4_pool (Debian image with python3)" do
    ECHO_UDP = <<~PY
      import socket
      s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
      s.bind(("0.0.0.0", 5000))
      print("ready", flush=True)
      while True:
          data, peer = s.recvfrom(65535)
          s.sendto(data.upper() + b" from " + peer[0].encode(), peer)
    PY

    # A TCP echo with a deep accept queue (busybox nc's is tiny: under load the guest then
    # drops handshakes, which tests the guest, not the stack) and a thread per connection.
    ECHO_TCP = <<~PY
      import socket, threading
      s = socket.socket()
      s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
      s.bind(("0.0.0.0", 7000))
      s.listen(256)
      def echo(c):
          buf = b""
          while True:
              d = c.recv(65536)
              if not d:
                  break
              buf += d
          c.sendall(buf)
          c.close()
      print("ready", flush=True)
      while True:
          c, _ = s.accept()
          threading.Thread(target=echo, args=(c,), daemon=True).start()
    PY

    def start_server(script)
      handle = @sb.exec_stream("python3", ["-c", script])
      ready = handle.each.find { |ev| ev.stdout? || ev.exited? }
      raise "a guest server did not start: #{ready.inspect}" unless ready&.stdout?

      handle
    end

    before(:all) do
      ref = MicrosandboxSpec::DebianImage.push(MicrosandboxSpec::Registry.instance)
      @udp = free_port(:udp)
      @udp6 = free_port(:udp, host: "::1")
      @tcp = free_port
      # public_only's defaults, plus an ingress rule against one host peer address over UDP.
      policy = Microsandbox::NetworkPolicy.custom(
        default_egress: :deny, default_ingress: :allow,
        rules: [Microsandbox::Rule.deny(destination: "127.0.0.3", direction: :ingress, protocol: :udp)]
      )
      @sb = Microsandbox::Sandbox.create(unique_name("udp"), image: ref, registry_insecure: true, network: policy,
                                                             ports: { @tcp => 7000 }, ports_udp: { @udp => 5000, "[::1]:#{@udp6}" => 5000 },
                                                             ipv4_pool: "10.77.0.0/24")
      @servers = [start_server(ECHO_UDP), start_server(ECHO_TCP)]
    end
    after(:all) do
      @servers&.each { |h| stop_server(h) }
      @sb&.kill
    end

    it "serves 100 concurrent TCP connections, each its own bytes" do
      data = Array.new(100) { |i| "conn-#{i}-" + ("x" * (1000 + i * 397)) + "\n" }
      results = data.map { |d| Thread.new { echo(@tcp, d) } }.map(&:value)
      results.each_with_index { |r, i| expect(r).to eq(data[i]), "connection #{i}" }
    end

    it "takes the link's addresses from ipv4_pool" do
      out = @sb.shell("cat /proc/net/route; cat /etc/resolv.conf /etc/hosts; python3 -c \"import socket; print(socket.gethostbyname('host.microsandbox.internal'))\"")
      expect(out.stdout).to include("nameserver 10.77.0.1", "10.77.0.1\thost.microsandbox.internal")
      expect(out.stdout.lines.last).to eq("10.77.0.1\n")
      # the default route's gateway, little-endian hex: 10.77.0.1
      expect(out.stdout).to match(/^eth0\s+00000000\s+01004D0A\s/)
    end

    it "relays datagrams both ways, each host peer answered on its own" do
      peers = Array.new(2) { UDPSocket.new.tap { |u| u.connect("127.0.0.1", @udp) } }
      peers.each_with_index { |u, i| u.send("ping #{i}", 0) }
      answers = peers.map { |u| Timeout.timeout(30) { u.recv(1000) } }
      expect(answers).to eq(["PING 0 from 10.77.0.1", "PING 1 from 10.77.0.1"])
      big = "z" * 30_000
      peers[0].send(big, 0)
      expect(Timeout.timeout(30) { peers[0].recv(65_535) }).to eq("#{"Z" * 30_000} from 10.77.0.1")
    ensure
      peers&.each(&:close)
    end

    it "relays datagrams from an IPv6 peer of a \"[::1]:port\" key (to the guest's IPv4 server)" do
      peer = UDPSocket.new(Socket::AF_INET6).tap { |u| u.connect("::1", @udp6) }
      peer.send("ping six", 0)
      expect(Timeout.timeout(30) { peer.recv(1000) }).to eq("PING SIX from 10.77.0.1")
    ensure
      peer&.close
    end

    # Answers that arrive for `peers` within `seconds`, one per peer at most.
    def answers_within(peers, seconds)
      got = {}
      deadline = Process.clock_gettime(Process::CLOCK_MONOTONIC) + seconds
      while got.size < peers.size
        left = deadline - Process.clock_gettime(Process::CLOCK_MONOTONIC)
        break if left <= 0

        ready, = IO.select(peers.reject { |u| got.key?(u) }, nil, nil, left)
        (ready || []).each { |u| got[u] = u.recv(1000) }
      end
      got
    end

    it "drops datagrams from a peer an ingress rule denies, logs why, and answers the others" do
      denied = UDPSocket.new.tap { |u| u.bind("127.0.0.3", 0) }
      allowed = UDPSocket.new.tap { |u| u.connect("127.0.0.1", @udp) }
      3.times { denied.send("no", 0, "127.0.0.1", @udp) }
      allowed.send("yes", 0)
      expect(answers_within([allowed], 30).values).to eq(["YES from 10.77.0.1"])
      expect(answers_within([denied], 3)).to be_empty
      logged = wait_until(timeout: 30) do
        system_log(@sb).match?(/refused inbound UDP from 127\.0\.0\.3:\d+ to published port 127\.0\.0\.1:#{@udp} \(guest port 5000\) \(rule 0/)
      end
      expect(logged).to be(true), system_log(@sb)
    ensure
      [denied, allowed].each { |u| u&.close }
    end

    it "tracks at most 256 host peers of published UDP ports, and says so" do
      # Earlier examples left at most 4 peers tracked (forgotten after 60 s idle), so of
      # 300 new peers between 252 and 256 are answered — never more than the cap.
      # The guest's socket drops datagrams under a burst (64 KiB receive buffers at MTU
      # 65520), so peers send in small batches and unanswered ones retry: a peer the stack
      # took keeps its slot, one beyond the cap is dropped every time.
      peers = Array.new(300) { UDPSocket.new.tap { |u| u.connect("127.0.0.1", @udp) } }
      got = {}
      4.times do
        pending = peers.reject { |u| got.key?(u) }
        pending.each_slice(16) do |batch|
          batch.each { |u| u.send("peer #{peers.index(u)}", 0) }
          got.merge!(answers_within(batch, 0.3))
        end
        got.merge!(answers_within(peers.reject { |u| got.key?(u) }, 3))
      end
      expect(got.size).to be_between(252, 256)
      expect(got.values).to all(match(/\APEER \d+ from 10\.77\.0\.1\z/))
      logged = wait_until(timeout: 30) { system_log(@sb).include?("256 UDP peers of published ports tracked") }
      expect(logged).to be(true), system_log(@sb)
    ensure
      peers&.each(&:close)
    end
  end
end

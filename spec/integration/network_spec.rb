# frozen_string_literal: true

require "digest"
require "socket"
require_relative "../support/netns"

# Guest networking against real VMs. Test traffic stays on loopback (inside the guest, or
# the host's 127.0.0.1 reached through the sandbox's gateway) or goes to the suite's own
# "internet" (spec/support/netns.rb: a network namespace with documentation addresses).
RSpec.describe "Guest networking" do
  # A TCP server on host loopback that runs `handler` for each client on its own thread.
  def host_server(&handler)
    server = TCPServer.new("127.0.0.1", 0)
    thread = Thread.new do
      loop do
        client = server.accept
        Thread.new(client) do |c|
          handler.call(c)
        rescue IOError, SystemCallError
          nil
        ensure
          c.close
        end
      end
    rescue IOError, SystemCallError
      nil
    end
    [server, thread]
  end

  describe "network: \"none\"" do
    before(:all) { @sb = Microsandbox::Sandbox.create(unique_name("net-lo"), image: rootfs, network: "none") }
    after(:all) { @sb&.kill }

    it "brings up lo, so a server and a client on 127.0.0.1 in one sandbox talk" do
      out = @sb.shell(<<~SH, timeout: 60)
        ip link show lo | grep -q 'UP' || { echo lo-down; exit 1; }
        echo ping-from-server | nc -l -p 7000 > /tmp/got &
        for i in $(seq 1 50); do netstat -ltn | grep -q ':7000 ' && break; sleep 0.1; done
        echo hello-from-client | nc 127.0.0.1 7000
        wait
        cat /tmp/got
      SH
      expect(out.stderr).to eq("")
      expect(out.stdout).to eq("ping-from-server\nhello-from-client\n")
      expect(out.exit_code).to eq(0)
    end

    it "has no NIC and no route: a connection fails at once" do
      expect(@sb.shell("ls /sys/class/net").stdout.split).to eq(["lo"])
      out = @sb.shell("nc 203.0.113.10 80 </dev/null; echo rc=$?", timeout: 30)
      expect(out.stdout).to include("rc=1")
      expect(out.stderr).to match(/unreachable/i)
    end
  end

  describe "network: \"allow_all\"" do
    # No name here needs DNS (/etc/hosts has the host alias); should the guest still ask,
    # the query goes to a closed loopback port, never to the host's real resolver.
    before(:all) do
      @sb = Microsandbox::Sandbox.create(unique_name("net-all"), image: rootfs, network: "allow_all",
                                                              dns: { nameservers: ["127.0.0.1:1"], query_timeout_ms: 500 })
    end
    after(:all) { @sb&.kill }

    it "configures eth0, the default route, resolv.conf and hosts" do
      out = @sb.shell("ip -4 addr show eth0; ip route; cat /etc/resolv.conf /etc/hosts")
      expect(out.exit_code).to eq(0)
      expect(out.stdout).to include("mtu 65520", "inet 172.16.0.2/30", "default via 172.16.0.1 dev eth0",
                                    "nameserver 172.16.0.1", "172.16.0.1\thost.microsandbox.internal")
      expect(out.stdout).to include("127.0.0.1 localhost").or include("127.0.0.1\tlocalhost")
    end

    it "reaches a TCP server on host loopback through host.microsandbox.internal" do
      server, thread = host_server do |c|
        line = c.gets
        c.write("host got #{line}")
      end
      port = server.addr[1]
      out = @sb.shell("echo from-guest | nc host.microsandbox.internal #{port}", timeout: 60)
      expect(out.stdout).to eq("host got from-guest\n")
      expect(out.exit_code).to eq(0)
    ensure
      server&.close
      thread&.join(5)
    end

    it "refuses a connection to a closed host port at once" do
      server = TCPServer.new("127.0.0.1", 0)
      port = server.addr[1]
      server.close # nothing listens there now
      started = Process.clock_gettime(Process::CLOCK_MONOTONIC)
      out = @sb.shell("nc 172.16.0.1 #{port} </dev/null; echo rc=$?", timeout: 60)
      elapsed = Process.clock_gettime(Process::CLOCK_MONOTONIC) - started
      expect(out.stdout).to include("rc=1")
      expect(out.stderr).to include("refused")
      expect(elapsed).to be < 10
    end

    it "moves 16 MiB each way byte-exact" do
      data = Random.new(42).bytes(16 << 20)
      down, down_thread = host_server { |c| c.write(data) }
      got = nil
      up, up_thread = host_server do |c|
        got = c.read
        c.write(Digest::SHA256.hexdigest(got))
      end
      out = @sb.shell(<<~SH, timeout: 300)
        nc 172.16.0.1 #{down.addr[1]} </dev/null > /tmp/down || exit 1
        sha256sum /tmp/down
        nc 172.16.0.1 #{up.addr[1]} < /tmp/down
      SH
      expect(out.exit_code).to eq(0)
      digest = Digest::SHA256.hexdigest(data)
      expect(out.stdout).to eq("#{digest}  /tmp/down\n#{digest}")
      expect(got&.bytesize).to eq(data.bytesize)
    ensure
      [down, up].each { |s| s&.close }
      [down_thread, up_thread].each { |t| t&.join(5) }
    end
  end

  describe "the default policy (public_only) against the test internet" do
    before(:all) do
      @net = MicrosandboxSpec::NetNS.start!
      @sb = Microsandbox::Sandbox.create(unique_name("net-pub"), image: rootfs,
                                                              dns: { nameservers: [@net::DNS], query_timeout_ms: 2000 })
    end
    after(:all) { @sb&.kill }

    let(:net) { @net }

    it "reaches the public internet by address and by name" do
      out = @sb.shell("wget -qO- http://#{net::WEB}/hello && wget -qO- http://inet.test/hello", timeout: 60)
      expect(out.stderr).to eq("")
      expect(out.stdout).to eq("hello from the test internet\n" * 2)
    end

    it "answers DNS through the gateway, NXDOMAIN for unknown names, and drops private answers" do
      out = @sb.shell("nslookup inet.test", timeout: 60)
      expect(out.stdout).to include(net::WEB)
      expect(@sb.shell("nslookup no-such-name.test", timeout: 60).stdout + @sb.shell("nslookup no-such-name.test").stderr)
        .to match(/NXDOMAIN|can't find/i)
      rebind = @sb.shell("nslookup rebind.test", timeout: 60)
      expect(rebind.stdout).not_to include("10.0.0.1")
    end

    it "downloads 64 MiB byte-exact" do
      out = @sb.shell("wget -qO- http://#{net::WEB}/big | sha256sum", timeout: 600)
      expect(out.exit_code).to eq(0)
      expect(out.stdout).to eq("#{net.big_sha256}  -\n")
    end

    it "refuses loopback (the host through the gateway), private and metadata addresses at once, and logs why" do
      server = TCPServer.new("127.0.0.1", 0)
      port = server.addr[1]
      started = Process.clock_gettime(Process::CLOCK_MONOTONIC)
      out = @sb.shell(<<~SH, timeout: 60)
        for target in "172.16.0.1 #{port}" "10.0.0.1 80" "169.254.169.254 80" "192.168.1.1 443"; do
          nc $target </dev/null 2>&1; echo "rc=$?"
        done
      SH
      elapsed = Process.clock_gettime(Process::CLOCK_MONOTONIC) - started
      expect(out.stdout.scan("rc=1").size).to eq(4), out.stdout
      expect(out.stdout.scan(/refused/i).size).to eq(4), out.stdout
      expect(elapsed).to be < 20
      system_log = @sb.logs(sources: ["system"]).map(&:text).join("\n")
      expect(system_log).to include("refused TCP connection to 172.16.0.1:#{port}", "refused TCP connection to 169.254.169.254:80",
                                    "refused TCP connection to 10.0.0.1:80")
    ensure
      server&.close
    end
  end
end

# frozen_string_literal: true

require "digest"
require "socket"

# Guest networking against real VMs. Test traffic stays on loopback (inside the guest, or
# the host's 127.0.0.1 reached through the sandbox's gateway).
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

  describe "loopback inside the guest (no NIC)" do
    before(:all) { @sb = Microsandbox::Sandbox.create(unique_name("net-lo"), image: rootfs) }
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

    it "has no NIC by default until policies are enforced" do
      expect(@sb.shell("ls /sys/class/net").stdout.split).to eq(["lo"])
    end
  end

  describe "network: \"allow_all\"" do
    before(:all) { @sb = Microsandbox::Sandbox.create(unique_name("net-all"), image: rootfs, network: "allow_all") }
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
end

# frozen_string_literal: true

require "digest"
require "resolv"
require "socket"
require_relative "../support/netns"
require_relative "../support/registry"
require_relative "../support/debian_image"

# Guest networking against real VMs. Test traffic stays on loopback (inside the guest, or
# the host's 127.0.0.1 reached through the sandbox's gateway) or goes to the suite's own
# "internet" (spec/support/netns.rb: a network namespace with documentation addresses).
RSpec.describe "Guest networking" do
  # A TCP server on host loopback that runs `handler` for each client on its own thread.
  # The supervisor's log thread writes entries shortly after the event: poll with wait_until.
  def system_log = @sb.logs(sources: ["system"]).map(&:text).join("\n")

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

  describe "UDP from a real client (the suite's Debian image, python3)" do
    before(:all) do
      @net = MicrosandboxSpec::NetNS.start!
      ref = MicrosandboxSpec::DebianImage.push(MicrosandboxSpec::Registry.instance)
      @sb = Microsandbox::Sandbox.create(unique_name("net-udp"), image: ref, registry_insecure: true,
                                                              dns: { nameservers: [@net::DNS], query_timeout_ms: 2000 })
    end
    after(:all) { @sb&.kill }

    # A UDP client in the guest: sends each payload (retrying a lost one), prints what
    # came back as hex, one line per datagram.
    def udp_client
      <<~PY
      import socket, sys
      host, port = sys.argv[1], int(sys.argv[2])
      s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
      s.settimeout(2)
      for size in map(int, sys.argv[3:]):
          payload = bytes((i * 7 + size) % 256 for i in range(size))
          for attempt in range(3):
              s.sendto(payload, (host, port))
              try:
                  data, peer = s.recvfrom(65535)
              except socket.timeout:
                  continue
              print(peer[0], peer[1], len(data), data == payload)
              break
          else:
              print("timeout", size)
      PY
    end

    it "relays datagrams to the test internet's echo server and back, byte-exact" do
      @sb.fs.write("/tmp/udp.py", udp_client)
      out = @sb.exec("python3", ["/tmp/udp.py", MicrosandboxSpec::NetNS::WEB, "7", "1", "512", "1400", "8000"], timeout: 120)
      expect(out.stderr).to eq("")
      expect(out.stdout.lines.map(&:split)).to eq(
        [[MicrosandboxSpec::NetNS::WEB, "7", "1", "True"], [MicrosandboxSpec::NetNS::WEB, "7", "512", "True"],
         [MicrosandboxSpec::NetNS::WEB, "7", "1400", "True"], [MicrosandboxSpec::NetNS::WEB, "7", "8000", "True"]]
      )
    end

    it "refuses UDP the policy forbids, and logs it" do
      @sb.fs.write("/tmp/udp.py", udp_client)
      out = @sb.exec("python3", ["/tmp/udp.py", "10.0.0.1", "7", "16"], timeout: 60)
      expect(out.stdout).to eq("timeout 16\n")
      expect(wait_until(timeout: 10) { system_log.include?("refused UDP to 10.0.0.1:7") }).to be(true), system_log
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

    # A query as a DNS-over-TCP client sends it: 2-byte length, then the message.
    def tcp_dns_query(id, name)
      msg = Resolv::DNS::Message.new(id)
      msg.rd = 1
      msg.add_question(name, Resolv::DNS::Resource::IN::A)
      bytes = msg.encode
      [bytes.bytesize].pack("n") + bytes
    end

    # The length-prefixed messages in `hex` (od output), decoded.
    def tcp_dns_answers(hex)
      bytes = [hex.split.join].pack("H*")
      out = []
      while bytes.bytesize >= 2
        len = bytes.unpack1("n")
        break if bytes.bytesize < 2 + len

        out << Resolv::DNS::Message.decode(bytes.byteslice(2, len))
        bytes = bytes.byteslice(2 + len..)
      end
      out
    end

    it "answers DNS over TCP through the same filter, pipelined, from the gateway and any address" do
      @sb.fs.write("/tmp/q", tcp_dns_query(1, "inet.test") + tcp_dns_query(2, "rebind.test") +
                             tcp_dns_query(3, "no-such-name.test"))
      out = @sb.shell("nc -w 5 172.16.0.1 53 < /tmp/q | od -An -v -tx1", timeout: 60)
      answers = tcp_dns_answers(out.stdout)
      expect(answers.map(&:id)).to eq([1, 2, 3]), out.inspect
      expect(answers[0].answer.map { |_, _, r| r.address.to_s }).to eq([net::WEB])
      expect(answers[1].answer).to be_empty # rebind protection: the private answer is dropped
      # The test internet's dnsmasq has no upstream: a name it does not know is REFUSED
      # (passed through as it came), never an answer.
      expect(answers[2].answer).to be_empty
      expect(answers[2].rcode).to eq(Resolv::DNS::RCode::Refused)
      # To another address on port 53: answered by the gateway's filter, never relayed.
      @sb.fs.write("/tmp/q2", tcp_dns_query(4, "other.inet.test"))
      out = @sb.shell("nc -w 5 198.51.100.7 53 < /tmp/q2 | od -An -v -tx1", timeout: 60)
      expect(tcp_dns_answers(out.stdout).map { |m| [m.id, m.answer.map { |_, _, r| r.address.to_s }] })
        .to eq([[4, ["203.0.113.11"]]])
    end

    # net.ipv4.ping_group_range decides whether the supervisor (root here, gid 0) may open
    # unprivileged ping sockets (set for the block only, see NetNS.with_ping_group_range).
    def with_ping_group_range(value, &block) = MicrosandboxSpec::NetNS.with_ping_group_range(value, &block)

    it "pings through host ping sockets where the host allows them, says why not where it does not" do
      with_ping_group_range("1 0") do # nobody may
        out = @sb.shell("ping -c 2 -W 2 #{net::WEB}; echo rc=$?", timeout: 60)
        expect(out.stdout).to include("rc=1")
      end
      expect(wait_until(timeout: 10) { system_log.include?("ICMP echo (ping) is unavailable") }).to be(true), system_log
      expect(system_log).to include("net.ipv4.ping_group_range")
      with_ping_group_range("0 0") do # root's group may
        out = @sb.shell("ping -c 3 -W 5 #{net::WEB}", timeout: 60)
        expect(out.stdout).to match(/3 packets transmitted, [1-3] packets received/), out.inspect
        expect(out.exit_code).to eq(0)
        # Refused by the policy: an immediate ICMP "administratively prohibited", logged.
        out = @sb.shell("ping -c 1 -W 2 10.0.0.1; echo rc=$?", timeout: 60)
        expect(out.stdout).to include("rc=1")
      end
      expect(wait_until(timeout: 10) { system_log.include?("refused ICMP echo to 10.0.0.1") }).to be(true), system_log
      # The gateway answers its own pings, whatever the host allows.
      out = @sb.shell("ping -c 2 -W 2 172.16.0.1", timeout: 60)
      expect(out.stdout).to include("2 packets received")
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
      wait_until(timeout: 10) { system_log.include?("refused TCP connection to 10.0.0.1:80") }
      expect(system_log).to include("refused TCP connection to 172.16.0.1:#{port}", "refused TCP connection to 169.254.169.254:80",
                                    "refused TCP connection to 10.0.0.1:80")
    ensure
      server&.close
    end
  end
end

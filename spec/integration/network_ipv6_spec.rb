# frozen_string_literal: true

require_relative "../support/netns"

# IPv6 in the guest network (dual stack), against a real VM: the agent's static address
# and route out of `ipv6_pool:`, the gateway's neighbour discovery and echo, TCP/UDP/DNS
# relayed under the same policy as IPv4. Traffic goes only to the suite's namespace
# (2001:db8:6d73::/64 on its veth), to an `unreachable` host route inside documentation
# space, or to host loopback — never anywhere else.
RSpec.describe "Guest networking over IPv6" do
  POOL6 = "fd00:6d73:1::/64"
  GATEWAY6 = "fd00:6d73:1::1"

  def system_log = @sb.logs(sources: ["system"]).map(&:text).join("\n")

  before(:all) do
    @net = MicrosandboxSpec::NetNS.start!
    n = @net
    ms = Microsandbox
    policy = ms::NetworkPolicy.custom(
      default_egress: :deny, default_ingress: :allow,
      rules: [
        ms::Rule.allow_dns,                                                                            # 0
        ms::Rule.allow(destination: "inet6.test", protocol: :tcp, port: 80),                          # 1
        ms::Rule.deny(destination: n::WEB6_OTHER),                                                     # 2
        ms::Rule.allow(destination: n::NET6, protocol: :tcp, port: 80),                                # 3
        ms::Rule.allow(destination: n::UNREACHABLE6),                                                  # 4
        ms::Rule.allow(destination: n::WEB6, protocol: :icmpv6)                                        # 5
      ]
    )
    @sb = ms::Sandbox.create(unique_name("net6"), image: rootfs, network: policy, ipv6_pool: POOL6,
                                                  dns: { nameservers: [n::DNS], query_timeout_ms: 2000 })
  end
  after(:all) { @sb&.kill }

  let(:net) { @net }

  it "configures eth0's IPv6 address and default route from ipv6_pool, and the gateway answers NDP and ping" do
    out = @sb.shell("ip -6 addr show dev eth0; ip -6 route; ping6 -c 1 -W 5 #{GATEWAY6}", timeout: 60)
    expect(out.stdout).to include("inet6 fd00:6d73:1::2/126", "default via #{GATEWAY6} dev eth0", "1 packets received")
    expect(out.exit_code).to eq(0)
  end

  it "connects over IPv6 where a rule allows it, and refuses at once where a rule denies it" do
    out = @sb.shell("wget -qO- http://[#{net::WEB6}]/hello", timeout: 60)
    expect([out.stdout, out.stderr]).to eq(["hello from the test internet\n", ""])
    started = Process.clock_gettime(Process::CLOCK_MONOTONIC)
    out = @sb.shell("wget -qO- http://[#{net::WEB6_OTHER}]/hello", timeout: 60)
    expect(Process.clock_gettime(Process::CLOCK_MONOTONIC) - started).to be < 20
    expect(out.exit_code).not_to eq(0)
    expect(out.stderr).to match(/refused/i)
    logged = wait_until(timeout: 30) { system_log.include?("refused TCP connection to [#{net::WEB6_OTHER}]:80 (rule 2") }
    expect(logged).to be(true), system_log
  end

  it "resolves AAAA through the gateway (over IPv6 too), pins the answer for the domain rule, drops private answers" do
    out = @sb.shell("nslookup -type=AAAA inet6.test #{GATEWAY6}", timeout: 60)
    expect(out.stdout).to include(net::WEB6_OTHER)
    # inet6.test answers with the address rule 2 denies: the domain rule (1) comes first
    # and holds for an address this sandbox resolved for that name.
    out = @sb.shell("wget -qO- http://inet6.test/hello", timeout: 60)
    expect([out.stdout, out.stderr]).to eq(["hello from the test internet\n", ""])
    rebind = @sb.shell("nslookup -type=AAAA rebind6.test; nslookup -type=AAAA local6.test", timeout: 60)
    expect(rebind.stdout).not_to include("fd00::1")
    expect(rebind.stdout).not_to match(/Address:\s+::1\b/)
  end

  it "refuses IPv6 loopback and the host (through the gateway) by default, and an unroutable address at once" do
    server = TCPServer.new("::1", 0)
    port = server.addr[1]
    started = Process.clock_gettime(Process::CLOCK_MONOTONIC)
    out = @sb.shell("wget -qO- http://[::1]:#{port}/; echo rc=$?; wget -qO- http://[#{GATEWAY6}]:#{port}/; echo rc=$?; " \
                    "wget -qO- http://[2001:db8:6d73:ffff::1]/; echo rc=$?", timeout: 90)
    expect(Process.clock_gettime(Process::CLOCK_MONOTONIC) - started).to be < 30
    expect(out.stdout.scan(/rc=(\d+)/).flatten).to all(satisfy { |rc| rc != "0" })
    expect(out.stderr.scan(/refused/i).size).to be >= 2
    expect(server.wait_readable(0)).to be_nil, "nothing reached the host's ::1"
    logged = wait_until(timeout: 30) { system_log.include?("refused TCP connection to [#{GATEWAY6}]:#{port} (default egress deny)") }
    expect(logged).to be(true), system_log
  ensure
    server&.close
  end

  it "reassembles the guest's fragments: pings larger than a lowered link MTU, over IPv6 and IPv4" do
    # The guest's kernel fragments a 3,000-byte echo request at MTU 1,280; the stack puts
    # it together, the gateway answers it whole (the stack's side of the link keeps MTU
    # 65,520), and the MTU goes back afterwards for the other examples.
    out = @sb.shell("old=$(cat /sys/class/net/eth0/mtu); ip link set dev eth0 mtu 1280 && " \
                    "ping6 -c 2 -s 3000 -W 5 #{GATEWAY6}; rc6=$?; ping -c 2 -s 3000 -W 5 172.16.0.1; rc4=$?; " \
                    "ip link set dev eth0 mtu $old; echo rc6=$rc6 rc4=$rc4 mtu=$(cat /sys/class/net/eth0/mtu)", timeout: 120)
    expect(out.stdout).to include("2 packets received").and(include("rc6=0 rc4=0 mtu=65520")), out.inspect
  end

  it "pings the test internet's IPv6 host through a host ping socket where a rule allows it, refuses where one denies it" do
    net.with_ping_group_range("0 0") do # root's group may open ping sockets (IPv6 ones too)
      out = @sb.shell("ping6 -c 3 -W 5 #{net::WEB6}", timeout: 60)
      expect(out.stdout).to match(/3 packets transmitted, [1-3] packets received/), out.inspect
      expect(out.exit_code).to eq(0)
      # Rule 2 denies WEB6_OTHER: an immediate ICMPv6 "administratively prohibited", logged.
      out = @sb.shell("ping6 -c 1 -W 5 #{net::WEB6_OTHER}; echo rc=$?", timeout: 60)
      expect(out.stdout).to include("rc=1")
    end
    logged = wait_until(timeout: 30) { system_log.include?("refused ICMP echo to #{net::WEB6_OTHER} (rule 2") }
    expect(logged).to be(true), system_log
  end
end

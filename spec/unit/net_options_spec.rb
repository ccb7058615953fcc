# frozen_string_literal: true

# The spellings `ports:`, `ports_udp:`, `ipv4_pool:`, `ipv6_pool:` and `max_connections:` take, and what
# the engine receives (it checks the values; see spec/integration/ports_spec.rb).
RSpec.describe Microsandbox::NetOptions do
  def config(ports: nil, ports_udp: nil, ipv4_pool: nil, max_connections: nil, ipv6_pool: nil)
    described_class.config(ports, ports_udp, ipv4_pool, max_connections, ipv6_pool)
  end

  it "passes nothing when no option is given" do
    expect(config).to eq({})
  end

  it "normalises the reference's {host => guest} Hash and address keys" do
    out = config(ports: { 8080 => 80, "8081" => "81", "0.0.0.0:8082" => 82, "[::1]:8083" => 83, " 127.0.0.2:8084 " => 84 },
                 ports_udp: { 5353 => 53 })
    expect(out["ports"]).to eq([
                                 { "host_port" => 8080, "guest_port" => 80 },
                                 { "host_port" => 8081, "guest_port" => 81 },
                                 { "bind" => "0.0.0.0", "host_port" => 8082, "guest_port" => 82 },
                                 { "bind" => "::1", "host_port" => 8083, "guest_port" => 83 },
                                 { "bind" => "127.0.0.2", "host_port" => 8084, "guest_port" => 84 }
                               ])
    expect(out["ports_udp"]).to eq([{ "host_port" => 5353, "guest_port" => 53 }])
    expect(config(ports: {})).to eq("ports" => [])
  end

  it "takes ipv4_pool as a String and max_connections as an Integer or digits" do
    expect(config(ipv4_pool: "10.0.0.0/24", max_connections: 64)).to eq("ipv4_pool" => "10.0.0.0/24", "max_connections" => 64)
    expect(config(max_connections: "32")).to eq("max_connections" => 32)
  end

  it "takes ipv6_pool as a String (the engine checks the CIDR)" do
    expect(config(ipv6_pool: "fd00:1::/64")).to eq("ipv6_pool" => "fd00:1::/64")
    expect(config(ipv4_pool: "10.0.0.0/24", ipv6_pool: "fd00:1::/64").keys).to eq(%w[ipv4_pool ipv6_pool])
  end

  it "rejects malformed spellings naming the option, never the value" do
    expect { config(ports: [[8080, 80]]) }.to raise_error(TypeError, /ports must be a Hash/)
    expect { config(ports_udp: "5353:53") }.to raise_error(TypeError, /ports_udp must be a Hash/)
    expect { config(ports: { "secret-ish" => 80 }) }.to raise_error(ArgumentError, /\Aports: a host port is/) { |e| expect(e.message).not_to include("secret-ish") }
    expect { config(ports: { nil => 80 }) }.to raise_error(ArgumentError, /ports: a host port is/)
    expect { config(ports: { "80:90:100" => 80 }) }.to raise_error(ArgumentError, /ports: a host port is/)
    ["::1:8080", "fe80::1:80", "1:2:3:4:5:6:7:8:80", "::ffff:10.0.0.1:80"].each do |bare|
      expect { config(ports_udp: { bare => 80 }) }
        .to raise_error(ArgumentError, /\Aports_udp: an IPv6 host address goes in brackets, "\[address\]:port"/) { |e| expect(e.message).not_to include(bare) }
    end
    expect(config(ports: { "[::]:8080" => 80 })["ports"]).to eq([{ "bind" => "::", "host_port" => 8080, "guest_port" => 80 }])
    expect { config(ports: { 8080 => "eighty" }) }.to raise_error(ArgumentError, /ports \(a guest port\) must be an Integer/)
    expect { config(ports: { 8080 => nil }) }.to raise_error(TypeError, /ports \(a guest port\) must be an Integer/)
    expect { config(max_connections: 1.5) }.to raise_error(TypeError, /max_connections must be an Integer/)
    expect { config(max_connections: "lots") }.to raise_error(ArgumentError, /max_connections must be an Integer or a String of digits/)
  end
end

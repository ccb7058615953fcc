# frozen_string_literal: true

require "ipaddr"

RSpec.describe Microsandbox::NetworkPolicy do
  let(:error) { Microsandbox::NetworkPolicyError }

  describe "presets" do
    it "builds each preset's wire Hash" do
      expect(described_class.public_only.to_h).to eq("preset" => "public_only")
      expect(described_class.none.to_h).to eq("preset" => "none")
      expect(described_class.allow_all.to_h).to eq("preset" => "allow_all")
      expect(described_class.non_local.to_h).to eq("preset" => "non_local")
      expect(described_class.none).to be_none
      expect(described_class.public_only).not_to be_none
    end

    it "accepts every alias, in any case, and the engine agrees on each" do
      described_class::PRESET_ALIASES.each do |name, canonical|
        expect(described_class.preset(name).preset).to eq(canonical)
        expect(described_class.preset(name.upcase.to_sym).preset).to eq(canonical)
      end
      expect(described_class::PRESET_ALIASES.values.uniq).to contain_exactly("none", "public_only", "allow_all", "non_local")
    end

    it "refuses an unknown preset without echoing it" do
      expect { described_class.preset("sekrit") }.to raise_error(error) { |e|
        expect(e.code).to eq("network-policy-error")
        expect(e.message).not_to include("sekrit")
        expect(e.message).to include("public_only")
      }
      expect { described_class.preset(42) }.to raise_error(TypeError)
    end
  end

  describe ".custom" do
    it "builds the wire Hash with defaults and normalised rules" do
      policy = described_class.custom(
        rules: [Microsandbox::Rule.allow_dns,
                Microsandbox::Rule.allow(destination: "api.example.com", protocol: :tcp, port: 443),
                { action: :deny, destination: Microsandbox::Destination.group(:link_local), protocols: [:udp], port: 1000..1999 }],
        deny_domains: ["ads.example"], deny_domain_suffixes: [".track.example"]
      )
      expect(policy.to_h).to eq(
        "default_egress" => "deny", "default_ingress" => "allow",
        "rules" => [
          { "action" => "allow", "direction" => "egress", "destination_kind" => "group", "destination" => "host",
            "protocols" => %w[udp tcp], "ports" => ["53"] },
          { "action" => "allow", "direction" => "egress", "destination" => "api.example.com",
            "protocols" => ["tcp"], "ports" => ["443"] },
          { "action" => "deny", "destination_kind" => "group", "destination" => "link-local",
            "protocols" => ["udp"], "ports" => ["1000-1999"] }
        ],
        "deny_domains" => ["ads.example"], "deny_domain_suffixes" => [".track.example"]
      )
      expect(policy.preset).to be_nil
      expect(policy.to_h).to be_frozen
      expect(policy.to_h["rules"].first).to be_frozen
    end

    it "names the bad key of a malformed rule and never echoes the value" do
      cases = {
        { destination: "10.0.0.0/33" } => "network.rules[0].destination",
        { destination: "has space.test" } => "network.rules[0].destination",
        { destination: "1.2.3.4", ports: ["10-5"] } => "network.rules[0].ports[0]",
        { destination: "1.2.3.4", port: 70_000 } => "network.rules[0].ports[0]",
        { destination: "1.2.3.4", port: "0" } => "network.rules[0].ports[0]",
        { destination: "1.2.3.4", protocol: :sctp } => "network.rules[0].protocols[0]",
        { destination_kind: "group", destination: "lan" } => "network.rules[0].destination",
        { direction: :sideways } => "network.rules[0].direction"
      }
      cases.each do |rule, key|
        expect { described_class.custom(rules: [{ action: :allow }.merge(rule)]) }.to raise_error(error) { |e|
          expect(e.message).to start_with("#{key}: ")
          secret = rule.values.last.to_s
          expect(e.message).not_to include(secret) unless secret.size < 3
        }
      end
      expect { described_class.custom(default_egress: :maybe) }.to raise_error(error, /network.default_egress/)
      expect { described_class.custom(rules: [{ action: :allow, colour: :red }]) }.to raise_error(error, /colour/)
      expect { described_class.custom(rules: ["allow all"]) }.to raise_error(TypeError)
      expect { described_class.custom(deny_domains: ["bad name"]) }.to raise_error(error, /network.deny_domains\[0\]/)
      expect { described_class.custom(rules: [{ action: :allow, port: 1.5 }]) }.to raise_error(TypeError)
    end
  end

  describe ".coerce" do
    it "takes a policy, nil, a name or a Hash" do
      policy = described_class.allow_all
      expect(described_class.coerce(policy)).to equal(policy)
      expect(described_class.coerce(nil)).to eq(described_class.public_only)
      expect(described_class.coerce(:airgapped)).to eq(described_class.none)
      expect(described_class.coerce("non-local")).to eq(described_class.non_local)
      expect(described_class.coerce({}).to_h).to eq({})
      expect(described_class.coerce(preset: :public, deny_domains: ["x.example"]).to_h)
        .to eq("preset" => "public_only", "deny_domains" => ["x.example"])
      expect(described_class.coerce(deny_domain_suffixes: [".ads.example"]).to_h)
        .to eq("deny_domain_suffixes" => [".ads.example"])
      expect(described_class.coerce("default_egress" => :allow, rules: [{ action: :deny, destination: "10.0.0.0/8" }]).to_h)
        .to eq("default_egress" => "allow", "rules" => [{ "action" => "deny", "destination" => "10.0.0.0/8" }])
      expect(described_class.coerce(described_class.public_only)).to respond_to(:to_h)
    end

    it "refuses a preset mixed with rules, unknown keys and wrong types" do
      expect { described_class.coerce(preset: :none, rules: []) }.to raise_error(error, /network.preset/)
      expect { described_class.coerce(sekrit: 1) }.to raise_error(error, /unknown key sekrit/)
      expect { described_class.coerce(42) }.to raise_error(TypeError, /network must be/)
      expect { described_class.coerce(rules: {}) }.to raise_error(TypeError)
    end
  end

  it "compares by wire Hash and inspects it" do
    expect(described_class.preset(:all)).to eq(described_class.allow_all)
    expect(described_class.preset(:all).hash).to eq(described_class.allow_all.hash)
    expect(described_class.allow_all.inspect).to eq('#<Microsandbox::NetworkPolicy {"preset"=>"allow_all"}>')
  end
end

RSpec.describe Microsandbox::Rule do
  it "builds allow and deny rules with defaults, merging singular and plural keys" do
    expect(described_class.allow).to eq("action" => "allow", "direction" => "egress")
    expect(described_class.deny(destination: "*", direction: :any, protocol: :tcp, protocols: [:udp], port: 80, ports: ["8000-9000"]))
      .to eq("action" => "deny", "direction" => "any", "destination" => "*", "protocols" => %w[udp tcp],
             "ports" => %w[8000-9000 80])
    expect(described_class.allow(destination: IPAddr.new("10.0.0.0/8"))["destination"]).to eq("10.0.0.0/8")
    expect(described_class.allow(destination: IPAddr.new("10.1.2.3"))["destination"]).to eq("10.1.2.3")
    expect(described_class.allow(ports: [(8000...8100)])["ports"]).to eq(["8000-8099"])
  end

  it "validates at once, naming the rule's key" do
    expect { described_class.allow(ports: ["10-5"]) }.to raise_error(Microsandbox::NetworkPolicyError, /\Arule.ports\[0\]: /)
    expect { described_class.deny(destination: "10.0.0.0/33") }.to raise_error(Microsandbox::NetworkPolicyError, /\Arule.destination: /)
    expect { described_class.allow(protocol: :sctp) }.to raise_error(Microsandbox::NetworkPolicyError, /protocol/)
    expect { described_class.allow(direction: 3) }.to raise_error(TypeError)
  end
end

RSpec.describe Microsandbox::Destination do
  it "builds each kind" do
    expect(described_class.any).to eq("destination_kind" => "any")
    expect(described_class.ip("1.1.1.1")).to eq("destination_kind" => "ip", "destination" => "1.1.1.1")
    expect(described_class.cidr("10.0.0.0/8")).to eq("destination_kind" => "cidr", "destination" => "10.0.0.0/8")
    expect(described_class.domain("api.example.com")).to eq("destination_kind" => "domain", "destination" => "api.example.com")
    expect(described_class.domain_suffix(".internal")).to eq("destination_kind" => "domain_suffix", "destination" => ".internal")
    described_class::GROUPS.each do |g|
      expect(described_class.group(g)).to eq("destination_kind" => "group", "destination" => g.to_s.tr("_", "-"))
    end
    expect(described_class.group("link-local")["destination"]).to eq("link-local")
  end

  it "refuses an unknown group without echoing it" do
    expect { described_class.group(:sekrit) }.to raise_error(Microsandbox::NetworkPolicyError) { |e|
      expect(e.message).not_to include("sekrit")
    }
  end
end

RSpec.describe Microsandbox::Network do
  describe ".dns_options" do
    it "passes a valid dns: Hash on as the wire Hash" do
      wire = described_class.dns_options(nameservers: ["127.0.0.1:5353", "dns.example:53", "::1"],
                                         query_timeout_ms: 2000, rebind_protection: false)
      expect(wire).to eq("nameservers" => ["127.0.0.1:5353", "dns.example:53", "::1"],
                         "query_timeout_ms" => 2000, "rebind_protection" => false)
      expect(wire).to be_frozen
      expect(described_class.dns_options(nil)).to be_nil
      expect(described_class.dns_options({})).to eq({})
    end

    it "names the bad key and never the value" do
      {
        { nameservers: ["not an ip:99999"] } => "dns.nameservers[0]",
        { nameservers: "1.1.1.1" } => "dns.nameservers",
        { query_timeout_ms: 0 } => "dns.query_timeout_ms",
        { rebind_protection: "no" } => "dns.rebind_protection",
        { sekrit: 1 } => "dns.sekrit"
      }.each do |opts, key|
        expect { described_class.dns_options(opts) }.to raise_error(Microsandbox::NetworkPolicyError) { |e|
          expect(e.message).to start_with("#{key}: ")
          expect(e.message).not_to include("99999")
        }
      end
      expect { described_class.dns_options([]) }.to raise_error(TypeError)
    end
  end
end

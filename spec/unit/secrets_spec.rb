# frozen_string_literal: true

RSpec.describe Microsandbox::Secrets do
  let(:value) { "sk-UNIT-SECRET-VALUE" }

  it "turns the reference keys into the engine's wire entries" do
    wire = described_class.secrets!([
                                      { env: "OPENAI_API_KEY", value: value, host: "api.openai.com",
                                        host_patterns: ["*.openai.com"], require_tls: true, inject_query: true,
                                        inject_body: false, on_violation: :block_and_terminate },
                                      { "env" => :TOKEN, "value" => value, "hosts" => %w[a.test b.test],
                                        "placeholder" => "{{TOKEN}}" }
                                    ])
    expect(wire[0]).to eq("env" => "OPENAI_API_KEY", "value" => value,
                          "hosts" => ["api.openai.com", "*.openai.com"], "require_tls" => true,
                          "inject" => { "query" => true, "body" => false }, "on_violation" => "block_and_terminate")
    expect(wire[1]).to eq("env" => "TOKEN", "value" => value, "hosts" => %w[a.test b.test], "placeholder" => "{{TOKEN}}")
  end

  it "accepts every on_secret_violation form" do
    expect(described_class.violation!("x", "block")).to eq("block")
    expect(described_class.violation!("x", :block_and_log)).to eq("block_and_log")
    expect(described_class.violation!("x", "passthrough")).to eq("passthrough")
    expect(described_class.violation!("x", { passthrough_all_hosts: true })).to eq("passthrough")
    expect(described_class.violation!("x", { passthrough_hosts: ["a.test"], passthrough_host_patterns: "*.b.test" }))
      .to eq("passthrough" => ["a.test", "*.b.test"])
  end

  it "normalises tls:" do
    expect(described_class.tls!({ bypass: "*.gov", verify_upstream: false, intercepted_ports: [443, 8443],
                                  block_quic: true, upstream_ca_cert: "/ca.pem",
                                  intercept_ca_cert: "/i.pem", intercept_ca_key: "/i.key" }))
      .to eq("bypass" => ["*.gov"], "verify_upstream" => false, "intercepted_ports" => [443, 8443],
             "block_quic" => true, "upstream_ca_cert" => ["/ca.pem"], "intercept_ca_cert" => "/i.pem",
             "intercept_ca_key" => "/i.key")
  end

  {
    "missing env" => [{ value: "sk-UNIT-SECRET-VALUE", host: "a.test" }, /secrets\[0\]\.env is required/],
    "missing value" => [{ env: "K", host: "a.test" }, /secrets\[0\] \(K\)\.value is required/],
    "empty value" => [{ env: "K", value: "", host: "a.test" }, /value must not be empty/],
    "no host" => [{ env: "K", value: "sk-UNIT-SECRET-VALUE" }, /give host:, hosts: or host_patterns:/],
    "unknown key" => [{ env: "K", value: "sk-UNIT-SECRET-VALUE", host: "a.test", hots: 1 }, /unknown key :hots/],
    "bad inject" => [{ env: "K", value: "sk-UNIT-SECRET-VALUE", host: "a.test", inject_body: "yes" }, /inject_body must be true or false/],
    "bad action" => [{ env: "K", value: "sk-UNIT-SECRET-VALUE", host: "a.test", on_violation: "explode" }, /on_violation must be one of/],
    "host not a string" => [{ env: "K", value: "sk-UNIT-SECRET-VALUE", host: 1 }, /host must be a String/]
  }.each do |name, (entry, message)|
    it "raises ArgumentError naming the key, never the value: #{name}" do
      expect { described_class.secrets!([entry]) }.to raise_error(ArgumentError, message) { |e|
        expect(e.message).not_to include(value)
      }
    end
  end

  it "rejects malformed tls: options by key" do
    expect { described_class.tls!({ intercepted_ports: [0] }) }.to raise_error(ArgumentError, /tls.intercepted_ports/)
    expect { described_class.tls!({ verify: true }) }.to raise_error(ArgumentError, /tls: unknown key :verify/)
    expect { described_class.tls!({ upstream_ca_cert: 5 }) }.to raise_error(ArgumentError, /tls.upstream_ca_cert/)
  end

  it "is checked by Sandbox.create before anything starts" do
    expect do
      Microsandbox::Sandbox.create("sec-unit", image: "/nonexistent", secrets: [{ env: "K", value: value }])
    end.to raise_error(ArgumentError, /host/) { |e| expect(e.message).not_to include(value) }
  end

  it "refuses tls: when nothing would be intercepted (no secrets, no intercept_all)" do
    expect do
      Microsandbox::Sandbox.create("sec-unit", image: "/nonexistent", tls: { verify_upstream: false })
    end.to raise_error(Microsandbox::InvalidConfigError, /nothing would be intercepted.*intercept_all/m)
  end

  it "maps the new error codes" do
    expect(Microsandbox::Error.build("secret-violation", "m")).to be_a(Microsandbox::SecretViolationError)
    expect(Microsandbox::Error.build("tls-error", "m")).to be_a(Microsandbox::TlsError)
  end
end

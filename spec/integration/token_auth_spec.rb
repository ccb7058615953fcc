# frozen_string_literal: true

require_relative "../support/registry"
require_relative "../support/token_server"

# A registry configured for token auth (`auth: token:`), with the specs' own token server.
RSpec.describe "registry token auth" do
  before(:all) do
    @tokens = MicrosandboxSpec::TokenServer.new("alice" => "s3cret").start
    @registry = MicrosandboxSpec::Registry.new(token_server: @tokens)
    @registry.start
    @ref = @registry.push_dir("private/busybox", "1.0", MicrosandboxSpec::Rootfs.busybox_dir)
  end

  after(:all) do
    @registry&.stop
    @tokens&.stop
  end

  let(:scope) { "repository:private/busybox:pull" }

  def token_requests_since(count) = @tokens.requests.drop(count)

  it "pulls with registry_auth through the token flow, and boots the image" do
    seen = @tokens.requests.size
    Microsandbox::Image.pull(@ref, registry_insecure: true, pull_policy: :always,
                                   registry_auth: { username: "alice", password: "s3cret" })
    # The engine asked the token server (as alice, for pull) and the registry took the token.
    expect(token_requests_since(seen)).to include(["alice", scope, 200])
    Microsandbox::Sandbox.create(unique_name("tok"), image: @ref, pull_policy: :never) do |sb|
      expect(sb.exec("echo", ["token ok"]).stdout).to eq("token ok\n")
    end
  end

  it "raises RegistryAuthError for a wrong password, and for anonymous access" do
    name = "#{@registry.host}/private/busybox:1.0"
    seen = @tokens.requests.size
    expect do
      Microsandbox::Image.pull(name, registry_insecure: true, pull_policy: :always,
                                     registry_auth: { username: "alice", password: "wrong" })
    end.to raise_error(Microsandbox::RegistryAuthError) { |e| expect(e.code).to eq("registry-auth-failed") }
    expect(token_requests_since(seen)).to include(["alice", scope, 401])

    # No credentials at all (and none from a docker config): an anonymous token grants
    # nothing, so the registry refuses it.
    Dir.mktmpdir do |empty|
      old = ENV.fetch("DOCKER_CONFIG", nil)
      ENV["DOCKER_CONFIG"] = empty
      seen = @tokens.requests.size
      expect { Microsandbox::Image.pull(name, registry_insecure: true, pull_policy: :always) }
        .to raise_error(Microsandbox::RegistryAuthError, /registry_auth/)
      expect(token_requests_since(seen)).to include([nil, scope, 200])
    ensure
      ENV["DOCKER_CONFIG"] = old
    end
  end
end

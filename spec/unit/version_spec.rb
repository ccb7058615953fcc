# frozen_string_literal: true

RSpec.describe "versions" do
  root = File.expand_path("../..", __dir__)

  it "keeps the gem, the native extension and the Cargo workspace in lock-step" do
    cargo = File.read(File.join(root, "Cargo.toml"))[/^\[workspace\.package\].*?^version = "([^"]+)"/m, 1]
    expect(Microsandbox::VERSION).to eq(cargo)
    expect(Microsandbox::Native.version).to eq(Microsandbox::VERSION)
  end

  it "names the version in the changelog" do
    expect(File.read(File.join(root, "CHANGELOG.md"))).to include("## #{Microsandbox::VERSION}")
  end
end

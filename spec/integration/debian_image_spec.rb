# frozen_string_literal: true

require_relative "../support/registry"
require_relative "../support/debian_image"

# A real distribution image, built by the suite with debootstrap and pulled through the gem.
RSpec.describe "a Debian image with python3" do
  before(:all) do
    @ref = MicrosandboxSpec::DebianImage.push(MicrosandboxSpec::Registry.instance)
  end

  it "boots, runs python3 and applies the image's Env and WorkingDir" do
    Microsandbox::Sandbox.create(unique_name("deb"), image: @ref, registry_insecure: true) do |sb|
      out = sb.exec("python3", ["-c", "import os, sys; print(sys.version_info.major, os.environ['MSB_IMAGE'], os.getcwd())"])
      expect([out.exit_code, out.stderr]).to eq([0, ""])
      expect(out.stdout).to eq("3 debian-python3 /srv/app\n")

      # A relative path resolves against the image's WorkingDir; LANG comes from its Env.
      expect(sb.exec("python3", ["hello.py"]).stdout).to match(/\Ahello from python 3\.\d+\n\z/)
      expect(sb.shell("echo $LANG").stdout).to eq("C.UTF-8\n")

      # Both layers are there; layer 2's whiteout removed layer 1's /etc/motd.
      expect(sb.exec("cat", ["/etc/debian_version"]).stdout).to match(/\A12\./)
      expect(sb.exec("test", ["-e", "/etc/motd"]).exit_code).to eq(1)
      # Ownership recorded from the tar survives (group shadow on /etc/shadow).
      expect(sb.exec("stat", ["-c", "%U:%G %a", "/etc/shadow"]).stdout).to eq("root:shadow 640\n")
    end
    expect(Microsandbox::Image.inspect(@ref).layers.size).to eq(2)
  end
end

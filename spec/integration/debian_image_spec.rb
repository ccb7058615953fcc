# frozen_string_literal: true

require_relative "../support/registry"
require_relative "../support/debian_image"
require_relative "../support/tar_writer"

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

  it "keeps extended attributes from PAX records (file capabilities, user.*) in the root" do
    # v2 file capabilities, effective: CAP_DAC_OVERRIDE|CAP_FOWNER|CAP_NET_RAW (0x0a is a newline byte).
    cap = [0x02000001, 0x200a, 0, 0, 0].pack("V5")
    ref = Dir.mktmpdir do |dir|
      w = MicrosandboxSpec::TarWriter.new
      w.dir("opt/xattr/", pax: { "SCHILY.xattr.user.dir" => "on a directory" })
      w.file("opt/xattr/capbin", "#!/bin/sh\n", mode: 0o755,
                                                 pax: { "SCHILY.xattr.security.capability" => cap,
                                                        "SCHILY.xattr.user.msb" => "hello xattr" })
      MicrosandboxSpec::Registry.instance.push_layers(
        "debian/xattrs", "v1", MicrosandboxSpec::DebianImage.layers + [w.write_layer(File.join(dir, "layer.tar.gz"))],
        env: MicrosandboxSpec::DebianImage::ENV
      )
    end
    Microsandbox::Sandbox.create(unique_name("xattr"), image: ref, registry_insecure: true) do |sb|
      script = <<~PY
        import os
        print(os.getxattr("/opt/xattr/capbin", "security.capability").hex())
        print(os.getxattr("/opt/xattr/capbin", "user.msb").decode())
        print(os.getxattr("/opt/xattr", "user.dir").decode())
        print(sorted(os.listxattr("/opt/xattr/capbin")))
      PY
      out = sb.exec("python3", ["-c", script])
      expect(out.stderr).to eq("")
      expect(out.stdout.lines.map(&:chomp)).to eq(
        [cap.unpack1("H*"), "hello xattr", "on a directory", "['security.capability', 'user.msb']"]
      )
    end
  end
end

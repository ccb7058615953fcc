# frozen_string_literal: true

RSpec.describe "shell:" do
  it "uses the shell: given at create for #shell and #shell_stream, also from Sandbox.get" do
    name = unique_name("shell")
    # /bin/echo as the "shell" shows exactly what #shell runs: `<shell> -c <script>`.
    Microsandbox::Sandbox.create(name, image: rootfs, shell: "/bin/echo") do |sb|
      expect(sb.shell("hi there").stdout).to eq("-c hi there\n")
      expect(sb.shell_stream("streamed").collect.stdout).to eq("-c streamed\n")
      expect(Microsandbox::Sandbox.get(name).shell("other").stdout).to eq("-c other\n")
      expect(Microsandbox::Sandbox.get(name, shell: "/bin/sh").shell("echo sh").stdout).to eq("sh\n")
    end
  end

  it "rejects bad shells before any VM starts" do
    name = unique_name("shell-bad")
    create = ->(**opts) { Microsandbox::Sandbox.create(name, image: rootfs, **opts) }
    expect { create.call(shell: "sh") }.to raise_error(Microsandbox::InvalidConfigError, /shell/)
    expect { create.call(shell: "/bin/s\0h") }.to raise_error(Microsandbox::InvalidConfigError, /shell/)
    expect { create.call(shell: :sh) }.to raise_error(TypeError, /shell/)
    expect(Microsandbox::Sandbox.list.map(&:name)).not_to include(name)
    expect(File.exist?(sandbox_dir(name))).to be(false)
  end
end

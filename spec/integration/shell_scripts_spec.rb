# frozen_string_literal: true

RSpec.describe "shell: and scripts:" do
  it "runs scripts by name from /.msb/scripts on PATH, for commands and the main process" do
    name = unique_name("scripts")
    scripts = { "greet" => "#!/bin/sh\necho hello \"$1\"\n", blob: "\x00\xffbin".b }
    Microsandbox::Sandbox.create(name, image: rootfs, scripts: scripts, entrypoint: %w[greet main]) do |sb|
      expect(sb.shell("greet world").stdout).to eq("hello world\n")
      expect(sb.exec("greet", ["exec"]).stdout).to eq("hello exec\n")
      expect(sb.fs.stat("/.msb/scripts/greet").mode & 0o7777).to eq(0o755)
      expect(sb.fs.read("/.msb/scripts/blob")).to eq("\x00\xffbin".b)
      expect(sb.shell("echo $PATH").stdout.strip).to end_with(":/.msb/scripts")
      expect(wait_until(timeout: 20) { sb.logs(sources: ["stdout"]).map(&:text).join.include?("hello main") }).to be(true)
      sb.stop
    end
    Microsandbox::Sandbox.start(name) { |sb| expect(sb.shell("greet again").stdout).to eq("hello again\n") }
  end

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

  it "rejects bad shells and scripts before any VM starts" do
    name = unique_name("shell-bad")
    create = ->(**opts) { Microsandbox::Sandbox.create(name, image: rootfs, **opts) }
    expect { create.call(shell: "sh") }.to raise_error(Microsandbox::InvalidConfigError, /shell/)
    expect { create.call(shell: "/bin/s\0h") }.to raise_error(Microsandbox::InvalidConfigError, /shell/)
    expect { create.call(shell: :sh) }.to raise_error(TypeError, /shell/)
    expect { create.call(scripts: { "a/b" => "" }) }.to raise_error(Microsandbox::InvalidConfigError, /script name/)
    expect { create.call(scripts: { ".." => "" }) }.to raise_error(Microsandbox::InvalidConfigError, /script name/)
    expect { create.call(scripts: { "n" * 256 => "" }) }.to raise_error(Microsandbox::InvalidConfigError, /script name/)
    expect { create.call(scripts: { "ok" => 1 }) }.to raise_error(TypeError, /scripts/)
    expect { create.call(scripts: ["ok"]) }.to raise_error(TypeError, /scripts/)
    expect(Microsandbox::Sandbox.list.map(&:name)).not_to include(name)
    expect(File.exist?(sandbox_dir(name))).to be(false)
  end
end

# frozen_string_literal: true

require "fileutils"
require "tmpdir"

RSpec.describe "root filesystem patches" do
  def patch = Microsandbox::Patch

  around do |example|
    Dir.mktmpdir("msb-patch") do |dir|
      @host = dir
      example.run
    end
  end

  def leaves_no_trace(name)
    expect(Microsandbox::Sandbox.list.map(&:name)).not_to include(name)
    expect(File.exist?(sandbox_dir(name))).to be(false)
    expect(processes_mentioning(sandbox_dir(name))).to be_empty
  end

  it "applies every kind of patch in order before create returns, and only once" do
    File.binwrite(File.join(@host, "seed.bin"), "\x00seed\xff".b)
    File.chmod(0o640, File.join(@host, "seed.bin"))
    tree = File.join(@host, "tree")
    FileUtils.mkdir_p(File.join(tree, "sub/deeper"))
    File.write(File.join(tree, "sub/deeper/file.txt"), "deep\n")
    File.write(File.join(tree, "run.sh"), "#!/bin/sh\necho run\n")
    File.chmod(0o755, File.join(tree, "run.sh"))
    File.symlink("sub/deeper/file.txt", File.join(tree, "shortcut"))
    FileUtils.mkdir_p(File.join(tree, "junk"))

    name = unique_name("patch")
    patches = [
      patch.text("/etc/app/conf", "k=\x00v\n".b, mode: 0o600),
      patch.mkdir("/var/lib/app/data", mode: 0o750),
      patch.append("/etc/passwd", "app:x:1000:1000::/home/app:/bin/sh\n"),
      patch.copy_file(File.join(@host, "seed.bin"), "/srv/seed.bin"),
      patch.copy_dir(tree, "/opt/tree"),
      patch.symlink("../opt/tree/run.sh", "/usr/run"),
      patch.remove("/opt/tree/junk"),
      patch.remove("/etc/hostname"),
      patch.remove("/does/not/exist"),
      # Hand-built Hashes and the reference gem's Patch.file; replace: true may shadow.
      { kind: "file", path: "/etc/profile", content: "# replaced\n", replace: true },
      { "kind" => "symlink", "target" => "/etc/app/conf", "link" => "/etc/group", "replace" => true }
    ]
    # The main process starts after the patches: it sees them.
    Microsandbox::Sandbox.create(name, image: rootfs, patches: patches, entrypoint: ["/bin/cat", "/etc/app/conf"]) do |sb|
      fs = sb.fs
      expect(fs.read("/etc/app/conf")).to eq("k=\x00v\n".b)
      expect(fs.stat("/etc/app/conf").mode & 0o7777).to eq(0o600)
      expect(fs.stat("/var/lib/app/data").mode & 0o7777).to eq(0o750)
      expect(fs.stat("/var/lib/app/data").directory?).to be(true)
      expect(fs.read_text("/etc/passwd").lines.last).to eq("app:x:1000:1000::/home/app:/bin/sh\n")
      expect(fs.read("/srv/seed.bin")).to eq("\x00seed\xff".b)
      expect(fs.stat("/srv/seed.bin").mode & 0o7777).to eq(0o640)
      expect(fs.read_text("/opt/tree/sub/deeper/file.txt")).to eq("deep\n")
      expect(fs.stat("/opt/tree/run.sh").mode & 0o7777).to eq(0o755)
      expect(sb.exec("readlink", ["/opt/tree/shortcut"]).stdout).to eq("sub/deeper/file.txt\n")
      expect(fs.read_text("/opt/tree/shortcut")).to eq("deep\n")
      expect(fs.read_text("/etc/profile")).to eq("# replaced\n")
      expect(sb.exec("readlink", ["/etc/group"]).stdout).to eq("/etc/app/conf\n")
      expect(sb.exec("readlink", ["/usr/run"]).stdout).to eq("../opt/tree/run.sh\n")
      expect(sb.exec("/usr/run").stdout).to eq("run\n")
      expect(fs.exists?("/opt/tree/junk")).to be(false)
      expect(fs.exists?("/etc/hostname")).to be(false)
      expect(fs.stat("/etc/app/conf").uid).to eq(0)
      expect(wait_until(timeout: 20) { sb.logs(sources: ["stdout"]).map(&:text).join.include?("k=") }).to be(true)
    end

    # Kept by the root, not applied again by start (the append is not doubled).
    Microsandbox::Sandbox.start(name) do |sb|
      expect(sb.fs.read_text("/etc/passwd").scan("app:x:1000").size).to eq(1)
      expect(sb.fs.read("/etc/app/conf")).to eq("k=\x00v\n".b)
    end
  end

  it "refuses to shadow an existing path without replace: true" do
    name = unique_name("patch-shadow")
    File.write(File.join(@host, "f"), "x")
    tree = File.join(@host, "tree")
    FileUtils.mkdir_p(File.join(tree, "etc"))
    File.write(File.join(tree, "etc/passwd"), "x")
    [
      [patch.text("/etc/passwd", "root::0:0::/:/bin/sh\n"), "text /etc/passwd"],
      [patch.file("/etc/passwd", "x"), "text /etc/passwd"],
      [patch.copy_file(File.join(@host, "f"), "/etc/passwd"), "copy_file"],
      [patch.symlink("/x", "/etc/passwd"), "symlink /etc/passwd"],
      [patch.copy_dir(tree, "/"), "copy_dir"]
    ].each do |p, label|
      expect { Microsandbox::Sandbox.create(name, image: rootfs, patches: [p]) }
        .to raise_error(Microsandbox::PatchFailedError, /patch 1 \(#{Regexp.escape(label)}.*already exists.*replace: true/)
      leaves_no_trace(name)
    end
  end

  it "fails create with PatchFailedError naming the patch, leaving nothing behind" do
    name = unique_name("patch-fail")
    expect do
      Microsandbox::Sandbox.create(name, image: rootfs,
                                         patches: [patch.mkdir("/ok"), patch.append("/no/such/file", "x")])
    end.to raise_error(Microsandbox::PatchFailedError, %r{patch 2 \(append /no/such/file\).*ENOENT}) { |e|
      expect(e).to be_a(Microsandbox::FilesystemError)
      expect(e.code).to eq("patch-failed")
    }
    leaves_no_trace(name)

    expect do
      Microsandbox::Sandbox.create(name, image: rootfs, patches: [patch.mkdir("/etc/passwd/sub")])
    end.to raise_error(Microsandbox::PatchFailedError, %r{patch 1 \(mkdir /etc/passwd/sub\)})
    leaves_no_trace(name)
  end

  it "rejects bad patches before any VM starts" do
    name = unique_name("patch-bad")
    expect { patch.text("etc/relative", "x") }.to raise_error(Microsandbox::InvalidConfigError, /absolute/)
    expect { patch.text("/etc/a\0b", "x") }.to raise_error(Microsandbox::InvalidConfigError, /NUL/)
    expect { patch.text("/etc/x", 5) }.to raise_error(TypeError, /content/)
    expect { patch.mkdir("/x", mode: 0o10000) }.to raise_error(Microsandbox::InvalidConfigError, /mode/)
    expect { patch.symlink("", "/x") }.to raise_error(Microsandbox::InvalidConfigError, /target/)
    expect { Microsandbox::Sandbox.create(name, image: rootfs, patches: ["/etc/x"]) }
      .to raise_error(ArgumentError, /patches\[0\]/)
    expect { Microsandbox::Sandbox.create(name, image: rootfs, patches: [{ "kind" => "chmod", "path" => "/x" }]) }
      .to raise_error(ArgumentError, /unknown kind/)
    expect { Microsandbox::Sandbox.create(name, image: rootfs, patches: [patch.remove("/")]) }
      .to raise_error(Microsandbox::InvalidConfigError, /root directory/)
    missing = File.join(@host, "missing")
    expect { Microsandbox::Sandbox.create(name, image: rootfs, patches: [patch.copy_file(missing, "/x")]) }
      .to raise_error(Microsandbox::InvalidConfigError, /copy_file .*missing/)
    expect { Microsandbox::Sandbox.create(name, image: rootfs, patches: [patch.copy_dir(missing, "/x")]) }
      .to raise_error(Microsandbox::InvalidConfigError, /copy_dir/)
    leaves_no_trace(name)
  end
end

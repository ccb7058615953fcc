# frozen_string_literal: true

require "fileutils"
require_relative "../support/registry"

# What a command sees of its identity, compared with `docker exec`: HOME from
# /etc/passwd, supplementary groups from /etc/group, a default PATH, and a working
# directory that exists (the sandbox's is created like Docker creates a container's).
RSpec.describe "command identity and working directory" do
  passwd = "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n" \
           "nobody:x:65534:65534:nobody:/:/bin/false\n"
  group = "root:x:0:\napp:x:1000:\nextra:x:2000:app\nother:x:2001:nobody,app\nnogroup:x:65534:\n"
  default_path = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
  let(:identity_patches) do
    [Microsandbox::Patch.text("/etc/passwd", passwd, replace: true),
     Microsandbox::Patch.text("/etc/group", group, replace: true)]
  end

  it "gives commands HOME, supplementary groups and PATH as docker exec --user does" do
    Microsandbox::Sandbox.create(unique_name("ident"), image: rootfs, patches: identity_patches) do |sb|
      home = ->(**kw) { sb.exec("sh", ["-c", "echo $HOME"], **kw).stdout }
      expect(home.call).to eq("/root\n")
      expect(home.call(user: "root")).to eq("/root\n")
      expect(home.call(user: "app")).to eq("/home/app\n")
      expect(home.call(user: "1000")).to eq("/home/app\n")
      expect(home.call(user: "1000:2001")).to eq("/home/app\n")
      # No passwd entry: HOME=/ (Docker's default), gid 0.
      expect(home.call(user: "4242")).to eq("/\n")
      expect(sb.exec("id", ["-u"], user: "4242").stdout).to eq("4242\n")
      expect(sb.exec("id", ["-g"], user: "4242").stdout).to eq("0\n")
      # HOME given explicitly wins.
      expect(home.call(user: "app", env: { "HOME" => "/custom" })).to eq("/custom\n")

      groups = ->(user) { sb.exec("id", ["-G"], user: user).stdout.split.map(&:to_i) }
      expect(groups.call("app")).to eq([1000, 2000, 2001])
      expect(groups.call("1000")).to eq([1000, 2000, 2001])
      # An explicit group replaces the supplementary groups (runc does the same).
      expect(groups.call("app:extra")).to eq([2000])
      expect(groups.call("1000:1000")).to eq([1000])
      expect(groups.call("4242")).to eq([0])
      expect(sb.exec("id", ["-G"]).stdout.split).to eq(["0"])

      expect(sb.exec("sh", ["-c", "echo $PATH"], user: "app").stdout).to eq("#{default_path}\n")
      # A shell through the same path.
      expect(sb.shell("id -G; echo $HOME", user: "app").stdout).to eq("1000 2000 2001\n/home/app\n")
      expect { sb.exec("true", user: "ghost") }.to raise_error(Microsandbox::Error, /unknown user "ghost"/)
    end
  end

  it "creates a missing workdir (nested, owned by the sandbox user) for commands and the main process" do
    Microsandbox::Sandbox.create(unique_name("wdir"), image: rootfs, user: "app", workdir: "/work/space/deep",
                                                      patches: identity_patches,
                                                      entrypoint: ["sh", "-c", "pwd > /tmp/main.txt; id -u >> /tmp/main.txt"]) do |sb|
      expect(sb.exec("sh", ["-c", "pwd; echo $HOME; id -G"]).stdout).to eq("/work/space/deep\n/home/app\n1000 2000 2001\n")
      owners = sb.exec("stat", ["-c", "%n %u:%g %a", "/work", "/work/space", "/work/space/deep"], user: "root").stdout
      expect(owners).to eq("/work 1000:1000 755\n/work/space 1000:1000 755\n/work/space/deep 1000:1000 755\n")
      expect(wait_until(timeout: 20) { sb.exec("cat", ["/tmp/main.txt"]).stdout == "/work/space/deep\n1000\n" }).to be(true)
      # Per-call user: same directory, its own HOME.
      expect(sb.shell("pwd; echo $HOME", user: "root").stdout).to eq("/work/space/deep\n/root\n")
      # A per-call cwd that does not exist stays an error, and creates nothing.
      expect { sb.exec("pwd", cwd: "/nope/deeper") }.to raise_error(Microsandbox::ExecFailedError, %r{cwd /nope/deeper})
      expect(sb.exec("test", ["-e", "/nope"]).success?).to be(false)
    end
  end

  it "creates the image's WorkingDir owned by the image's User, and runs its main process there" do
    registry = MicrosandboxSpec::Registry.instance
    dir = Dir.mktmpdir("msb-ident-root")
    begin
      system("cp", "-a", "#{rootfs}/.", dir, exception: true)
      File.write(File.join(dir, "etc/passwd"), passwd)
      File.write(File.join(dir, "etc/group"), group)
      ref = registry.push_dir("team/ident", "1.0", dir, env: ["PATH=#{default_path}"], workdir: "/srv/app",
                                                       user: "app", cmd: ["sh", "-c", "pwd > /tmp/main.txt; id -G >> /tmp/main.txt"])
    ensure
      FileUtils.rm_rf(dir)
    end
    Microsandbox::Sandbox.create(unique_name("imgid"), image: ref, registry_insecure: true) do |sb|
      main_ran = wait_until(timeout: 20) { sb.exec("cat", ["/tmp/main.txt"]).stdout == "/srv/app\n1000 2000 2001\n" }
      expect(main_ran).to be(true), -> { "main process: #{sb.exec('cat', ['/tmp/main.txt']).inspect} #{sb.logs.map(&:text)}" }
      expect(sb.shell("pwd; echo $HOME; id -u").stdout).to eq("/srv/app\n/home/app\n1000\n")
      expect(sb.exec("stat", ["-c", "%u:%g %a", "/srv", "/srv/app"]).stdout).to eq("1000:1000 755\n1000:1000 755\n")
    end
  end
end

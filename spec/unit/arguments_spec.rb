# frozen_string_literal: true

require "pathname"

# Argument checks that happen in Ruby, before any native call or VM.
RSpec.describe "argument validation" do
  let(:create) { Microsandbox::Sandbox.method(:create) }

  it "rejects a nil name and non-String images with TypeError" do
    expect { create.call(nil, image: "/x") }.to raise_error(TypeError, /name must be a String/)
    expect { create.call("a", image: 5) }.to raise_error(TypeError, /image must be a String/)
  end

  it "takes names as the reference gem does: to_s, 1-128 bytes of UTF-8, no control characters" do
    v = Microsandbox::Validate
    expect(v.name!(:box)).to eq("box")
    expect(v.name!(42)).to eq("42")
    expect(v.name!("my box é")).to eq("my box é")
    expect(v.name!("é" * 64).bytesize).to eq(128)
    ["", "é" * 65, "x" * 129, "a\nb", "a\0b", "tab\there", "\e[31m"].each do |bad|
      expect { v.name!(bad) }.to raise_error(Microsandbox::InvalidConfigError, /sandbox name/), bad.inspect
    end
    expect { v.name!("\xFF".b) }.to raise_error(Microsandbox::InvalidConfigError, /UTF-8/)
    expect { create.call("a\nb", image: "/x") }.to raise_error(Microsandbox::InvalidConfigError)
  end

  it "rejects non-Integer sizes" do
    expect { create.call("a", image: "/x", cpus: "2") }.to raise_error(TypeError, /cpus must be an Integer/)
    expect { create.call("a", image: "/x", memory: 1.5) }.to raise_error(TypeError, /memory must be an Integer/)
  end

  it "rejects bad env shapes and coerces env and label values with to_s" do
    expect { create.call("a", image: "/x", env: []) }.to raise_error(TypeError, /env must be a Hash/)
    expect(Microsandbox::Validate.coerce_values!("env", { "A" => 1, b: :x, "C" => "s" }))
      .to eq({ "A" => "1", b: "x", "C" => "s" })
  end

  it "checks the reference gem's create options (fstype:, init:, log_level:, rlimits:) before anything starts" do
    expect(Microsandbox::Sandbox::DISK_IMAGE_EXTENSIONS).to eq(%w[raw qcow2 vmdk])
    expect { create.call("a", image: "/x", fstype: "ext4") }.to raise_error(ArgumentError, /fstype.*disk-image/)
    expect { create.call("a", image: "alpine.raw", fstype: "ext4") }.to raise_error(ArgumentError, /fstype/) # not a path
    expect { create.call("a", image: "/x.qcow2", fstype: 4) }.to raise_error(TypeError, /fstype/)
    expect { create.call("a", image: "/x", init: 5) }.to raise_error(TypeError, /init/)
    expect { create.call("a", image: "/x", init: { args: ["x"] }) }.to raise_error(ArgumentError, /cmd/)
    expect { create.call("a", image: "/x", init: { cmd: "/i", user: "x" }) }.to raise_error(ArgumentError, /unknown key/)
    expect { create.call("a", image: "/x", log_level: :loud) }.to raise_error(Microsandbox::InvalidConfigError, /log_level/)
    expect { create.call("a", image: "/x", rlimits: { nofile: -1 }) }.to raise_error(TypeError, /rlimits/)
  end

  it "rejects unknown keywords" do
    expect { create.call("a", image: "/x", cpu: 1) }.to raise_error(ArgumentError, /cpu/)
  end

  it "validates exec-style arguments" do
    v = Microsandbox::Validate
    expect { v.string_array!("args", ["a", 1]) }.to raise_error(TypeError, /args\[1\] must be a String/)
    expect { v.string_array!("args", "a") }.to raise_error(TypeError, /Array of Strings/)
    expect { v.timeout!("timeout", -1) }.to raise_error(Microsandbox::InvalidConfigError)
    expect { v.timeout!("timeout", "1") }.to raise_error(TypeError)
    expect { v.utf8!("args", "\xFF".b) }.to raise_error(Microsandbox::InvalidConfigError, /UTF-8/)
    expect(v.env!("env", { a: "1" })).to eq([%w[a 1]])
  end

  it "coerces exec's command, arguments and env with to_s, as the reference gem does" do
    v = Microsandbox::Validate
    expect(v.argv!(:echo, ["ok", 1, :sym, nil, Pathname("/p")])).to eq(["echo", ["ok", "1", "sym", "", "/p"]])
    expect(v.argv!("echo", "one")).to eq(["echo", ["one"]])
    expect(v.argv!("true", nil)).to eq(["true", []])
    expect { v.argv!("echo", ["\xFF".b]) }.to raise_error(Microsandbox::InvalidConfigError, /UTF-8/)
    expect(v.exec_env!("env", { N: 1, "S" => :x })).to eq([%w[N 1], %w[S x]])
    expect(v.exec_env!("env", nil)).to eq([])
    expect { v.exec_env!("env", ["A=1"]) }.to raise_error(TypeError, /env must be a Hash/)
    # Checked before any native call: `timeout: 0` on an allocated (never connected)
    # sandbox raises ExecTimeoutError after the coercion, not TypeError.
    sb = Microsandbox::Sandbox.allocate
    expect { sb.exec(:echo, [1], env: { N: 2 }, timeout: 0) }.to raise_error(Microsandbox::ExecTimeoutError)
  end

  it "refuses Strings that are not UTF-8 as InvalidConfigError naming the option, before anything starts" do
    bad = "x\xFF".b
    {
      { image: "/r#{bad}" } => /image must be valid UTF-8/,
      { image: "/x", workdir: "/w#{bad}" } => /workdir must be valid UTF-8/,
      { image: "/x", hostname: bad } => /hostname must be valid UTF-8/,
      { image: "/x", user: bad } => /user must be valid UTF-8/,
      { image: "/x", pull_policy: bad } => /pull_policy must be valid UTF-8/,
      { image: "/x", init: "/sbin/#{bad}" } => /init.cmd must be valid UTF-8/,
      { image: "127.0.0.1:1/a:b", registry_auth: { username: bad, password: "p" } } =>
        /registry_auth.username must be valid UTF-8/
    }.each do |options, message|
      expect { create.call("a", **options) }.to raise_error(Microsandbox::InvalidConfigError, message), options.inspect
    end
    expect { Microsandbox::Sandbox.create_with_progress("a", image: "r#{bad}") }
      .to raise_error(Microsandbox::InvalidConfigError, /image must be valid UTF-8/)
    expect { Microsandbox::Image.get(bad) }.to raise_error(Microsandbox::InvalidConfigError, /reference/)
    expect { Microsandbox::Image.remove(bad) }.to raise_error(Microsandbox::InvalidConfigError, /reference/)
    expect { Microsandbox::Image.start_pull(bad) }.to raise_error(Microsandbox::InvalidConfigError, /reference/)

    # exec's cwd:, user:, rlimits: keys and logs' sources: (checked before the native call).
    sb = Microsandbox::Sandbox.allocate
    expect { sb.exec("pwd", cwd: "/#{bad}") }.to raise_error(Microsandbox::InvalidConfigError, /cwd must be valid UTF-8/)
    expect { sb.exec_stream("pwd", cwd: "/#{bad}") }.to raise_error(Microsandbox::InvalidConfigError, /cwd/)
    expect { sb.shell("pwd", cwd: "/#{bad}") }.to raise_error(Microsandbox::InvalidConfigError, /cwd/)
    expect { sb.exec("id", user: bad) }.to raise_error(Microsandbox::InvalidConfigError, /user must be valid UTF-8/)
    expect { sb.exec_stream("id", user: bad) }.to raise_error(Microsandbox::InvalidConfigError, /user/)
    expect { sb.exec("true", rlimits: { bad => 1 }) }.to raise_error(Microsandbox::InvalidConfigError, /rlimits/)
    expect { sb.logs(sources: [bad]) }.to raise_error(Microsandbox::InvalidConfigError, /sources must be valid UTF-8/)

    v = Microsandbox::Validate
    expect(v.json!({ "a" => ["é", { "b" => :c }] })).to eq('{"a":["é",{"b":"c"}]}')
    expect { v.json!({ "a" => [{ "b" => bad }] }) }.to raise_error(Microsandbox::InvalidConfigError, /a\[0\]\.b must be/)
    expect { v.json!({ bad => 1 }) }.to raise_error(Microsandbox::InvalidConfigError, /must be valid UTF-8/)
  end

  it "refuses a block on create_with_progress and needs image:" do
    expect { Microsandbox::Sandbox.create_with_progress("a", image: "/x") { nil } }
      .to raise_error(ArgumentError, /no block/)
    expect { Microsandbox::Sandbox.create_with_progress("a") }.to raise_error(ArgumentError, /image/)
  end

  it "reads pull progress as the reference gem's event Hash too" do
    p = Microsandbox::PullProgress.new(digest: "sha256:ab", done: 5, total: 10)
    expect([p["kind"], p["digest"], p["downloaded_bytes"], p["total_bytes"]])
      .to eq(["layer_download_progress", "sha256:ab", 5, 10])
    expect([p.done, p[:total], p.fraction]).to eq([5, 10, 0.5])
    expect { Microsandbox::PullSession.new(nil).sandbox }.to raise_error(ArgumentError, /Image.start_pull/)
  end
end

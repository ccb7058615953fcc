# frozen_string_literal: true

require "open3"
require "securerandom"
require "tmpdir"

RSpec.describe "secrets that never enter the VM" do
  # A fresh value per run, so a hit can only come from this run.
  let(:value) { "sk-live-#{SecureRandom.hex(16)}" }
  let(:secrets) { [{ env: "API_KEY", value: value, host: "api.example.test" }] }

  # Every file under `dir` whose bytes contain `needle` (disks included).
  def files_containing(dir, needle)
    out, status = Open3.capture2("grep", "-rlaF", "--", needle, dir)
    expect(status.exitstatus).to be <= 1
    out.split("\n")
  end

  def state_files
    Dir[File.join(Microsandbox.home, "*")].select { |f| File.file?(f) }
  end

  it "gives the guest only the placeholder, hands the value to the supervisor in memory, and stores it nowhere" do
    name = unique_name("secrets")
    Microsandbox::Sandbox.create(name, image: rootfs, secrets: secrets, env: { "OTHER" => "x" }) do |sb|
      expect(sb.shell("echo $API_KEY").stdout).to eq("$MSB_API_KEY\n")
      expect(sb.shell("echo $OTHER").stdout).to eq("x\n")
      # Every process's environment, every file, the kernel log: the value is nowhere.
      environ = sb.shell("cat /proc/[0-9]*/environ | tr '\\0' '\\n' | grep -c 'API_KEY=' ; " \
                         "cat /proc/[0-9]*/environ | grep -c -F '#{value}'")
      counts = environ.stdout.split.map(&:to_i)
      expect(counts[0]).to be >= 1
      expect(counts[1]).to eq(0)
      grep = sb.shell("for d in / /tmp /run /dev/shm; do find $d -xdev -type f 2>/dev/null; done | " \
                      "xargs grep -lsF '#{value}'; dmesg | grep -cF '#{value}'")
      expect(grep.stdout).to eq("0\n")
      expect(sb.inspect).not_to include(value)
      @first_ca = sb.fs.read("/.msb/tls/extra.pem")
      expect(@first_ca).to start_with("-----BEGIN CERTIFICATE-----")

      log = File.read(File.join(sandbox_dir(name), "supervisor.log"))
      expect(log).to include("1 secret(s) held in memory for interception: API_KEY")
      expect(files_containing(sandbox_dir(name), value)).to eq([])
    end
    expect(files_containing(sandbox_dir(name), value)).to eq([])
    state_files.each { |f| expect(File.binread(f)).not_to include(value) }
    info = Microsandbox::Sandbox.list.find { |i| i.name == name }
    expect(info.config.to_s).not_to include(value)
    expect(info.config.to_s).to include("API_KEY")

    # Values are never stored: starting again needs them, and says so by env name.
    expect { Microsandbox::Sandbox.start(name) }.to raise_error(Microsandbox::InvalidConfigError, /API_KEY.*pass secrets:/m) { |e|
      expect(e.code).to eq("invalid-config")
    }
    Microsandbox::Sandbox.start(name, secrets: secrets) do |sb|
      expect(sb.shell("echo $API_KEY").stdout).to eq("$MSB_API_KEY\n")
      # The busybox image has no CA bundle: it got one, holding this boot's CA only (the
      # previous boot's block was replaced, not stacked).
      out = sb.shell("grep -c 'BEGIN microsandbox' /etc/ssl/certs/ca-certificates.crt; " \
                     "grep -c 'BEGIN CERTIFICATE' /etc/ssl/certs/ca-certificates.crt /.msb/tls/bundle.pem /.msb/tls/extra.pem")
      expect(out.stdout).to eq("1\n/etc/ssl/certs/ca-certificates.crt:1\n/.msb/tls/bundle.pem:1\n/.msb/tls/extra.pem:1\n")
      ca = sb.fs.read("/.msb/tls/extra.pem")
      expect(ca).not_to eq(@first_ca)
    end
    expect(files_containing(sandbox_dir(name), value)).to eq([])
  ensure
    Microsandbox::Sandbox.remove(name) if name && Microsandbox::Sandbox.list.any? { |i| i.name == name && i.status == :stopped }
  end

  it "stops the sandbox on a block_and_terminate violation (a placeholder in a DNS name); later calls raise SecretViolationError" do
    name = unique_name("secterm")
    # The query never leaves the host (answered NXDOMAIN); the resolver is a closed loopback port.
    sb = Microsandbox::Sandbox.create(name, image: rootfs, dns: { nameservers: ["127.0.0.1:1"], query_timeout_ms: 500 },
                                            secrets: [{ env: "K", value: value, host: "api.example.test",
                                                        on_violation: "block_and_terminate" }])
    begin
      sb.shell('nslookup "x${K}y.example.test" 172.16.0.1', timeout: 60)
    rescue Microsandbox::SecretViolationError, Microsandbox::SandboxNotRunningError
      nil # the sandbox may stop while the command runs
    end
    expect(wait_until(timeout: 60) { !sb.running? }).to be(true)
    expect { sb.exec("true") }.to raise_error(Microsandbox::SecretViolationError, /block_and_terminate/) { |e|
      expect(e.code).to eq("secret-violation")
      expect(e.message).not_to include(value)
    }
    expect(sb.last_stop.source).to eq("secret-violation")
    log = sb.logs(sources: ["system"]).map(&:text).join("\n")
    expect(log).to include("secret K placeholder in the DNS query name", "stopping the sandbox (block_and_terminate)")
    expect(log).not_to include(value)
  ensure
    Microsandbox::Sandbox.remove(name) if name && Microsandbox::Sandbox.list.any? { |i| i.name == name && i.status != :running }
  end

  it "copies the host's CA roots into the guest with trust_host_cas: true (no secrets needed)" do
    host_certs = File.read("/etc/ssl/certs/ca-certificates.crt").scan("BEGIN CERTIFICATE").size
    Microsandbox::Sandbox.create(unique_name("sectrust"), image: rootfs, trust_host_cas: true, network: "none") do |sb|
      out = sb.shell("grep -c 'BEGIN CERTIFICATE' /etc/ssl/certs/ca-certificates.crt; echo $SSL_CERT_FILE $NODE_EXTRA_CA_CERTS")
      expect(out.stdout).to eq("#{host_certs}\n/.msb/tls/bundle.pem /.msb/tls/extra.pem\n")
    end
  end

  it "refuses bad secret and tls options with typed errors that never echo a value" do
    bad = [{ env: "API_KEY", value: "#{value}\r\nX: y", host: "api.example.test" }]
    expect { Microsandbox::Sandbox.create(unique_name("secbad"), image: rootfs, secrets: bad) }
      .to raise_error(Microsandbox::InvalidConfigError, /value contains NUL, CR or LF/) { |e| expect(e.message).not_to include(value) }
    expect { Microsandbox::Sandbox.create(unique_name("secbad"), image: rootfs, secrets: secrets, env: { "API_KEY" => "x" }) }
      .to raise_error(Microsandbox::InvalidConfigError, /API_KEY is also a secret/)
    expect { Microsandbox::Sandbox.create(unique_name("secbad"), image: rootfs, secrets: secrets, tls: { intercept_ca_cert: "/x.pem" }) }
      .to raise_error(Microsandbox::InvalidConfigError, /intercept_ca_key/)

    Dir.mktmpdir do |dir|
      key = File.join(dir, "ca.key")
      cert = File.join(dir, "ca.pem")
      _, status = Open3.capture2e("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                                  "-nodes", "-keyout", key, "-out", cert, "-days", "1", "-subj", "/CN=spec CA",
                                  "-addext", "basicConstraints=critical,CA:TRUE")
      expect(status).to be_success
      File.chmod(0o644, key)
      expect do
        Microsandbox::Sandbox.create(unique_name("secbad"), image: rootfs, secrets: secrets,
                                                            tls: { intercept_ca_cert: cert, intercept_ca_key: key })
      end.to raise_error(Microsandbox::TlsError, /chmod 600/) { |e| expect(e.code).to eq("tls-error") }
      expect do
        Microsandbox::Sandbox.create(unique_name("secbad"), image: rootfs, secrets: secrets,
                                                            tls: { intercept_ca_cert: cert, intercept_ca_key: File.read(key).sub("A", "B") })
      end.to raise_error(Microsandbox::TlsError) { |e| expect(e.message).not_to include("PRIVATE KEY") }
      File.chmod(0o600, key)
      name = unique_name("secca")
      Microsandbox::Sandbox.create(name, image: rootfs, secrets: secrets,
                                         tls: { intercept_ca_cert: File.read(cert), intercept_ca_key: File.read(key) }) do |sb|
        expect(sb.shell("echo $API_KEY").stdout).to eq("$MSB_API_KEY\n")
      end
      expect(files_containing(sandbox_dir(name), "PRIVATE KEY")).to eq([])
      state_files.each { |f| expect(File.binread(f)).not_to include("PRIVATE KEY") }
      expect { Microsandbox::Sandbox.start(name, secrets: secrets) }.to raise_error(Microsandbox::InvalidConfigError, /intercept_ca_key/)
      Microsandbox::Sandbox.remove(name)
    end
  end
end

# frozen_string_literal: true

require "digest"
require "fileutils"
require "rbconfig"
require_relative "../support/registry"
require_relative "../support/debian_image"

# Two Ruby processes pull the same image into one empty store at the same moment: both
# succeed, every blob is stored once, one root disk is built, and both boot it.
RSpec.describe "concurrent pulls from two processes" do
  let(:lib) { File.expand_path("../../lib", __dir__) }

  # Waits on stdin (the starting gun), then creates a sandbox from the image and runs python3.
  let(:child_script) do
    <<~'RUBY'
      require "microsandbox"
      $stdin.read
      t0 = Process.clock_gettime(Process::CLOCK_MONOTONIC)
      Microsandbox::Sandbox.create(ARGV[1], image: ARGV[0], registry_insecure: true) do |sb|
        out = sb.exec("python3", ["-c", "print('ok')"])
        puts "#{out.stdout.strip} exit=#{out.exit_code}"
      end
      warn format("%s done in %.1f s", ARGV[1], Process.clock_gettime(Process::CLOCK_MONOTONIC) - t0)
    RUBY
  end

  it "both succeed and store each blob once" do
    registry = MicrosandboxSpec::Registry.instance
    ref = MicrosandboxSpec::DebianImage.push(registry, "debian/concurrent", "v1")
    Dir.mktmpdir("msb-concurrent") do |home|
      # An empty image store, with the already installed runtime (hard links: cheap, and an
      # install replaces files by rename, so the suite's own home is never written through them).
      %w[bin runtime].each { |d| FileUtils.cp_lr(File.join(Microsandbox.home, d), home) }
      env = { "MICROSANDBOX_HOME" => home, "MICROSANDBOX_NO_AUTO_INSTALL" => "1" }
      names = [unique_name("pull-a"), unique_name("pull-b")]
      children = names.map do |name|
        rd, wr = IO.pipe
        out_r, out_w = IO.pipe
        pid = Process.spawn(env, RbConfig.ruby, "-I", lib, "-e", child_script, ref, name,
                            in: rd, out: out_w, err: out_w)
        rd.close
        out_w.close
        [pid, wr, out_r]
      end
      children.each { |_, wr, _| wr.close } # both start now
      results = children.map do |pid, _, out_r|
        output = out_r.read
        [Process.wait2(pid)[1], output]
      end

      results.zip(names).each do |(status, output), name|
        expect(status.success?).to be(true), "#{name} failed:\n#{output}"
        expect(output).to include("ok exit=0")
        puts output.lines.grep(/done in/).join
      end

      blobs = Dir[File.join(home, "images/blobs/sha256/*")]
      # Manifest, config and two layers; each file holds exactly the bytes its name promises.
      expect(blobs.size).to eq(4)
      blobs.each { |b| expect(Digest::SHA256.file(b).hexdigest).to eq(File.basename(b)) }
      expect(Dir[File.join(home, "images/roots/*")].size).to eq(1)
      expect(Dir[File.join(home, "images/tmp/*")]).to be_empty
      # ...and downloaded once: the second process waited for the first one's blob.
      MicrosandboxSpec::DebianImage.layers.each do |layer|
        expect(registry.requests("GET", "/v2/debian/concurrent/blobs/#{layer.digest}")).to eq(1)
      end
    end
  end
end

# frozen_string_literal: true

require "digest"
require "fileutils"
require "json"
require "net/http"
require "socket"
require "tmpdir"
require "zlib"

module MicrosandboxSpec
  # A real OCI registry (Debian's docker-registry) on 127.0.0.1 for the specs, and a
  # minimal pusher speaking the registry HTTP API, so tests build and push their own images.
  class Registry
    BINARY = "/usr/bin/docker-registry"

    attr_reader :host

    def self.instance
      @instance ||= new.tap(&:start)
    end

    # A registry that authenticates with tokens from `token_server` (a TokenServer); the
    # push helpers get their own push tokens from it.
    def initialize(token_server: nil)
      @token_server = token_server
    end

    def start
      raise "#{BINARY} is missing: apt-get install docker-registry (bin/setup does)" unless File.executable?(BINARY)

      @dir = Dir.mktmpdir("msb-registry")
      port = free_port
      @host = "127.0.0.1:#{port}"
      File.write(File.join(@dir, "config.yml"), <<~YAML)
        version: 0.1
        log: { level: error }
        storage:
          filesystem: { rootdirectory: #{@dir}/data }
          delete: { enabled: true }
        http: { addr: #{@host} }
      YAML
      File.write(File.join(@dir, "config.yml"), "auth: #{JSON.generate(@token_server.registry_config)}\n", mode: "a") if @token_server
      # stdout is the access log (combined log format), read by #requests.
      @pid = Process.spawn(BINARY, "serve", File.join(@dir, "config.yml"), out: access_log, err: File::NULL)
      deadline = Time.now + 20
      until ping
        raise "docker-registry did not start on #{@host}" if Time.now > deadline

        sleep 0.1
      end
      # Only the process that started it stops it (a spec's forked child exits too).
      owner = Process.pid
      at_exit { stop if Process.pid == owner }
      self
    end

    def stop
      return unless @pid

      Process.kill(:TERM, @pid)
      Process.wait(@pid)
    rescue Errno::ESRCH, Errno::ECHILD
      nil
    ensure
      @pid = nil
      FileUtils.rm_rf(@dir) if @dir
    end

    # How many requests so far had `method` and a path starting with `path_prefix`.
    def requests(method, path_prefix)
      File.foreach(access_log).count { |l| l.include?("\"#{method} #{path_prefix}") }
    end

    # Pushes `rootfs_dir` as a one-layer image; returns "host/name:tag".
    def push_dir(name, tag, rootfs_dir, env: [], workdir: nil, cmd: nil, entrypoint: nil, user: nil)
      tar = IO.popen(["tar", "-C", rootfs_dir, "--numeric-owner", "--owner=0", "--group=0", "-cf", "-", "."], "rb", &:read)
      raise "tar failed" unless $?.success?

      gz = Zlib.gzip(tar)
      layer = upload(name, gz)
      config_json = JSON.generate(
        "architecture" => "amd64", "os" => "linux",
        "config" => { "Env" => env, "WorkingDir" => workdir, "Cmd" => cmd, "Entrypoint" => entrypoint,
                       "User" => user }.compact,
        "rootfs" => { "type" => "layers", "diff_ids" => ["sha256:#{Digest::SHA256.hexdigest(tar)}"] }
      )
      config = upload(name, config_json)
      manifest = JSON.generate(
        "schemaVersion" => 2,
        "mediaType" => "application/vnd.oci.image.manifest.v1+json",
        "config" => { "mediaType" => "application/vnd.oci.image.config.v1+json", "digest" => config, "size" => config_json.bytesize },
        "layers" => [{ "mediaType" => "application/vnd.oci.image.layer.v1.tar+gzip", "digest" => layer, "size" => gz.bytesize }]
      )
      request(Net::HTTP::Put, "/v2/#{name}/manifests/#{tag}", manifest,
              "Content-Type" => "application/vnd.oci.image.manifest.v1+json")
      "#{host}/#{name}:#{tag}"
    end

    # Pushes prepared gzip layer files (objects with #path, #digest, #size, #diff_id), in
    # order, as one image; returns "host/name:tag".
    def push_layers(name, tag, layers, env: [], workdir: nil, cmd: nil)
      layers.each { |l| upload_file(name, l.path, l.digest) }
      config_json = JSON.generate(
        "architecture" => "amd64", "os" => "linux",
        "config" => { "Env" => env, "WorkingDir" => workdir, "Cmd" => cmd }.compact,
        "rootfs" => { "type" => "layers", "diff_ids" => layers.map(&:diff_id) }
      )
      config = upload(name, config_json)
      manifest = JSON.generate(
        "schemaVersion" => 2,
        "mediaType" => "application/vnd.oci.image.manifest.v1+json",
        "config" => { "mediaType" => "application/vnd.oci.image.config.v1+json", "digest" => config, "size" => config_json.bytesize },
        "layers" => layers.map { |l| { "mediaType" => "application/vnd.oci.image.layer.v1.tar+gzip", "digest" => l.digest, "size" => l.size } }
      )
      request(Net::HTTP::Put, "/v2/#{name}/manifests/#{tag}", manifest,
              "Content-Type" => "application/vnd.oci.image.manifest.v1+json")
      "#{host}/#{name}:#{tag}"
    end

    private

    def access_log = File.join(@dir, "access.log")

    # Streams a (large) blob from a file, unless the registry already has it.
    def upload_file(name, path, digest)
      h, p = host.split(":")
      Net::HTTP.start(h, p.to_i) do |http|
        return if http.head("/v2/#{name}/blobs/#{digest}", auth_headers("/v2/#{name}/blobs/")).code == "200"
      end
      res = request(Net::HTTP::Post, "/v2/#{name}/blobs/uploads/", "")
      location = URI.join("http://#{host}", res["Location"])
      query = [location.query, "digest=#{digest}"].compact.join("&")
      File.open(path, "rb") do |f|
        Net::HTTP.start(h, p.to_i, read_timeout: 300) do |http|
          req = Net::HTTP::Put.new("#{location.path}?#{query}",
                                   { "Content-Type" => "application/octet-stream",
                                     "Content-Length" => File.size(path).to_s }.merge(auth_headers(location.path)))
          req.body_stream = f
          res = http.request(req)
          raise "registry PUT blob #{digest}: #{res.code} #{res.body}" unless res.code.start_with?("2")
        end
      end
    end

    def upload(name, bytes)
      digest = "sha256:#{Digest::SHA256.hexdigest(bytes)}"
      res = request(Net::HTTP::Post, "/v2/#{name}/blobs/uploads/", "")
      location = URI.join("http://#{host}", res["Location"])
      sep = location.query ? "&" : "?"
      request(Net::HTTP::Put, "#{location.path}?#{location.query}#{sep}digest=#{digest}".sub("?&", "?"), bytes,
              "Content-Type" => "application/octet-stream")
      digest
    end

    def request(klass, path, body, headers = {})
      h, p = host.split(":")
      Net::HTTP.start(h, p.to_i) do |http|
        req = klass.new(path, headers.merge(auth_headers(path)))
        req.body = body
        res = http.request(req)
        raise "registry #{klass::METHOD} #{path}: #{res.code} #{res.body}" unless res.code.start_with?("2")

        res
      end
    end

    # With token auth, a push token for the repository the path names.
    def auth_headers(path)
      name = path[%r{\A/v2/(.+?)/(blobs|manifests)/}, 1]
      return {} unless @token_server && name

      { "Authorization" => "Bearer #{@token_server.token('pusher', name, %w[pull push])}" }
    end

    def ping
      %w[200 401].include?(Net::HTTP.get_response(URI("http://#{host}/v2/")).code)
    rescue StandardError
      false
    end

    def free_port
      s = TCPServer.new("127.0.0.1", 0)
      s.addr[1]
    ensure
      s&.close
    end
  end
end
